import type { FloatKind } from '../../proto/delta.js';
import { LayoutError, finishRanges, type TensorRange } from './types.js';

/**
 * Where the tensors of an ONNX model are, from one walk over its protobuf wire format
 * (protobuf "Encoding" spec; field numbers from onnx/onnx.proto). Only the messages that lead to
 * tensors are entered; every other field is skipped by its length, so the cost is one step per
 * field, not per byte, and nothing is copied. A file that is not ONNX, or is damaged, throws
 * LayoutError and the caller diffs it without a layout.
 *
 * Names are paths, stable across two exports of one architecture: the top graph is "main", a node
 * adds "/<node name>", an attribute ".<attribute name>", a subgraph or a Constant's tensor hangs
 * under its attribute ("main/If_0.then_branch/weight", "main/Constant_3.value").
 */

const VARINT = 0;
const I64 = 1;
const LEN = 2;
const I32 = 5;

/** Messages nest through graph → node → attribute → graph; a model nesting deeper is hostile. */
const MAX_DEPTH = 64;
/** Longer names are not from an exporter, and would make every tensor below them costly to name. */
const MAX_PATH_CHARS = 4096;
/** Protobuf field numbers stop at 2^29 − 1. */
const MAX_FIELD = 0x1fffffff;

/** TensorProto.DataType values whose raw_data is an array of little-endian IEEE floats. */
const RAW_FLOAT = new Map<number, FloatKind>([
  [1, 'f32'], // FLOAT
  [10, 'f16'], // FLOAT16
  [11, 'f64'], // DOUBLE
  [14, 'f32'], // COMPLEX64: (real, imaginary) pairs of FLOAT
  [15, 'f64'], // COMPLEX128: pairs of DOUBLE
  [16, 'bf16'], // BFLOAT16
]);

/** TensorProto's typed repeated fields: wire type of one unpacked element, and element kind. */
const TYPED_FIELDS = new Map<number, { element: number; float: FloatKind | null }>([
  [4, { element: I32, float: 'f32' }], // float_data
  [5, { element: VARINT, float: null }], // int32_data
  [7, { element: VARINT, float: null }], // int64_data
  [10, { element: I64, float: 'f64' }], // double_data
]);

type Visit = (field: number, wire: number, from: number, to: number, value: number) => void;

const utf8 = new TextDecoder('utf-8');

class Walker {
  readonly ranges: TensorRange[] = [];

  constructor(private readonly buf: Uint8Array) {}

  /** ModelProto: ir_version = 1, graph = 7, functions = 25. */
  model(): void {
    let irVersion = false;
    let graphs = 0;
    this.fields(0, this.buf.length, (field, wire, from, to) => {
      if (field === 1) {
        this.expect(wire, VARINT, 'ModelProto.ir_version');
        irVersion = true;
      } else if (field === 7) {
        this.expect(wire, LEN, 'ModelProto.graph');
        graphs++;
        this.graph(from, to, 'main', 1);
      } else if (field === 25) {
        this.expect(wire, LEN, 'ModelProto.functions');
        this.function(from, to, 1);
      }
    });
    if (!irVersion || graphs === 0) throw new LayoutError('not an ONNX model: no ir_version or no graph');
  }

  /** GraphProto: node = 1, initializer = 5 (sparse_initializer = 15 is left to the generic diff). */
  private graph(start: number, end: number, path: string, depth: number): void {
    this.deeper(depth);
    let nodes = 0;
    let initializers = 0;
    this.fields(start, end, (field, wire, from, to) => {
      if (field === 1) {
        this.expect(wire, LEN, 'GraphProto.node');
        this.node(from, to, path, nodes++, depth + 1);
      } else if (field === 5) {
        this.expect(wire, LEN, 'GraphProto.initializer');
        const index = initializers++;
        this.tensor(from, to, depth + 1, (name) => this.join(path, '/', name || `initializer[${index}]`));
      }
    });
  }

  /** FunctionProto: name = 1, node = 7, domain = 10, overload = 13. */
  private function(start: number, end: number, depth: number): void {
    this.deeper(depth);
    let name = '';
    let domain = '';
    let overload = '';
    const nodes: number[] = [];
    this.fields(start, end, (field, wire, from, to) => {
      if (field === 1 || field === 10 || field === 13) {
        this.expect(wire, LEN, 'FunctionProto name');
        const s = this.text(from, to);
        if (field === 1) name = s;
        else if (field === 10) domain = s;
        else overload = s;
      } else if (field === 7) {
        this.expect(wire, LEN, 'FunctionProto.node');
        nodes.push(from, to);
      }
    });
    const path = this.join('functions', '/', overload ? `${domain}:${name}:${overload}` : `${domain}:${name}`);
    for (let i = 0; i < nodes.length; i += 2) this.node(nodes[i]!, nodes[i + 1]!, path, i / 2, depth + 1);
  }

  /**
   * NodeProto: name = 3, op_type = 4, attribute = 5. The name may follow the attributes, so the
   * attributes are entered after the node is read. An unnamed node is called by its op_type and
   * its index in the graph ("Constant[7]"), which two exports of one architecture share.
   */
  private node(start: number, end: number, path: string, index: number, depth: number): void {
    this.deeper(depth);
    let name = '';
    let opType = '';
    const attributes: number[] = [];
    this.fields(start, end, (field, wire, from, to) => {
      if (field === 3 || field === 4) {
        this.expect(wire, LEN, 'NodeProto name');
        if (field === 3) name = this.text(from, to);
        else opType = this.text(from, to);
      } else if (field === 5) {
        this.expect(wire, LEN, 'NodeProto.attribute');
        attributes.push(from, to);
      }
    });
    if (attributes.length === 0) return;
    const nodePath = this.join(path, '/', name || `${opType || 'node'}[${index}]`);
    for (let i = 0; i < attributes.length; i += 2) this.attribute(attributes[i]!, attributes[i + 1]!, path, nodePath, i / 2, depth + 1);
  }

  /** AttributeProto: name = 1, t = 5, g = 6, tensors = 10, graphs = 11. */
  private attribute(start: number, end: number, graphPath: string, nodePath: string, index: number, depth: number): void {
    this.deeper(depth);
    let name = '';
    const parts: number[] = [];
    this.fields(start, end, (field, wire, from, to) => {
      if (field === 1) {
        this.expect(wire, LEN, 'AttributeProto.name');
        name = this.text(from, to);
      } else if (field === 5 || field === 6 || field === 10 || field === 11) {
        this.expect(wire, LEN, 'AttributeProto value');
        parts.push(field, from, to);
      }
    });
    if (parts.length === 0) return;
    const path = this.join(nodePath, '.', name || `attr[${index}]`);
    let tensors = 0;
    let graphs = 0;
    for (let i = 0; i < parts.length; i += 3) {
      const [field, from, to] = [parts[i]!, parts[i + 1]!, parts[i + 2]!];
      if (field === 5) {
        // A Constant's value: by its own name in the graph when it has one (exporters store the
        // parameter's name there, which survives constants added or removed elsewhere), else by
        // the attribute's path, which holds only while the graph's node order does.
        this.tensor(from, to, depth + 1, (own) => (own ? this.join(graphPath, '/', own) : path));
      } else if (field === 6) {
        this.graph(from, to, path, depth + 1);
      } else if (field === 10) {
        const named = `${path}[${tensors++}]`;
        this.tensor(from, to, depth + 1, () => named);
      } else {
        this.graph(from, to, `${path}[${graphs++}]`, depth + 1);
      }
    }
  }

  /**
   * TensorProto: data_type = 2, name = 8, raw_data = 9, and the packed typed fields float_data = 4,
   * int32_data = 5, int64_data = 7, double_data = 10. data_type may follow the data, so the
   * ranges are emitted after the whole message is read.
   */
  private tensor(start: number, end: number, depth: number, nameOf: (tensorName: string) => string): void {
    this.deeper(depth);
    let dataType = 0;
    let tensorName = '';
    const data: number[] = [];
    this.fields(start, end, (field, wire, from, to, value) => {
      if (field === 2) {
        this.expect(wire, VARINT, 'TensorProto.data_type');
        dataType = value;
      } else if (field === 8) {
        this.expect(wire, LEN, 'TensorProto.name');
        tensorName = this.text(from, to);
      } else if (field === 9) {
        this.expect(wire, LEN, 'TensorProto.raw_data');
        data.push(field, from, to);
      } else {
        const typed = TYPED_FIELDS.get(field);
        if (typed === undefined) return;
        // Packed is the norm; parsers must also accept elements one by one, which are left alone.
        if (wire === LEN) data.push(field, from, to);
        else this.expect(wire, typed.element, 'TensorProto typed data');
      }
    });
    if (data.length === 0) return;
    const name = nameOf(tensorName);
    for (let i = 0; i < data.length; i += 3) {
      const [field, from, to] = [data[i]!, data[i + 1]!, data[i + 2]!];
      const float = field === 9 ? (RAW_FLOAT.get(dataType) ?? null) : (TYPED_FIELDS.get(field)?.float ?? null);
      this.ranges.push({ name, offset: from, length: to - from, float });
    }
  }

  /** Calls `visit` for each field of the message in [start, end), in file order. */
  private fields(start: number, end: number, visit: Visit): void {
    const at = { pos: start };
    while (at.pos < end) {
      const tag = this.varint(at, end);
      const field = Math.floor(tag / 8);
      const wire = tag % 8;
      if (field === 0 || field > MAX_FIELD) throw new LayoutError(`invalid field number ${field} at byte ${at.pos}`);
      const from = at.pos;
      switch (wire) {
        case VARINT: {
          const value = this.varint(at, end);
          visit(field, wire, from, at.pos, value);
          break;
        }
        case I64:
        case I32: {
          const size = wire === I64 ? 8 : 4;
          if (size > end - from) throw new LayoutError(`fixed-width field runs past its message at byte ${from}`);
          at.pos = from + size;
          visit(field, wire, from, at.pos, 0);
          break;
        }
        case LEN: {
          const length = this.varint(at, end);
          const payload = at.pos;
          if (length > end - payload) throw new LayoutError(`length ${length} at byte ${from} runs past its message`);
          at.pos = payload + length;
          visit(field, wire, payload, at.pos, length);
          break;
        }
        default:
          // 3 and 4 are proto2 groups, which onnx.proto does not use; 6 and 7 do not exist.
          throw new LayoutError(`wire type ${wire} at byte ${from}`);
      }
    }
  }

  /** A base-128 varint of at most 10 bytes; values beyond 2^53 lose precision, which no length or tag here reaches. */
  private varint(at: { pos: number }, end: number): number {
    let value = 0;
    let scale = 1;
    for (let i = 0; i < 10; i++) {
      if (at.pos >= end) throw new LayoutError(`varint runs past its message at byte ${at.pos}`);
      const b = this.buf[at.pos++]!;
      value += (b & 0x7f) * scale;
      if (b < 0x80) return value;
      scale *= 128;
    }
    throw new LayoutError(`varint longer than 10 bytes before byte ${at.pos}`);
  }

  private text(from: number, to: number): string {
    if (to - from > MAX_PATH_CHARS) throw new LayoutError(`name of ${to - from} bytes at byte ${from}`);
    const bytes = this.buf.subarray(from, to);
    // Names are short and ASCII; TextDecoder's per-call cost dominated models with many tensors.
    if (bytes.length <= 64) {
      let ascii = true;
      for (let i = 0; i < bytes.length && ascii; i++) ascii = bytes[i]! < 0x80;
      if (ascii) return String.fromCharCode.apply(null, bytes as unknown as number[]);
    }
    return utf8.decode(bytes);
  }

  private join(path: string, sep: string, name: string): string {
    if (path.length + sep.length + name.length > MAX_PATH_CHARS) throw new LayoutError(`tensor path longer than ${MAX_PATH_CHARS} characters`);
    return path + sep + name;
  }

  private expect(wire: number, want: number, what: string): void {
    if (wire !== want) throw new LayoutError(`${what} has wire type ${wire}, expected ${want}`);
  }

  private deeper(depth: number): void {
    if (depth > MAX_DEPTH) throw new LayoutError(`messages nested deeper than ${MAX_DEPTH}`);
  }
}

/** The tensor data ranges of an ONNX model, sorted by offset. Throws LayoutError only. */
export function onnxTensorRanges(bytes: Uint8Array): TensorRange[] {
  const walker = new Walker(bytes);
  walker.model();
  return finishRanges(walker.ranges, bytes.length);
}

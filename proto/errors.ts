/**
 * One catalog for every error that crosses a process boundary: on the wire (`{ok:false,error:{code,message}}`),
 * in logs, and as process exit codes. proto/README.md lists the same codes; a test keeps the two in step.
 */
export const ERRORS = {
  EF_BAD_PAYLOAD: 'payload is not valid for its topic',
  EF_PAYLOAD_TOO_LARGE: 'payload exceeds the size limit for its topic',
  EF_UNKNOWN_METHOD: 'unknown operator method',
  EF_BAD_PARAMS: 'parameters are not valid for the method',
  EF_FORBIDDEN: 'the identity is not allowed to do this',
  EF_UNKNOWN_DEVICE: 'no such device',
  EF_DEVICE_EXISTS: 'a device with this id already exists',
  EF_UNKNOWN_OPERATOR: 'no such operator',
  EF_OPERATOR_EXISTS: 'an operator with this name already exists',
  EF_PATCH_FAILED: 'the JSON Patch does not apply to the current document',
  EF_DESIRED_INVALID: 'the resulting desired state is not valid',
  EF_VERSION_CONFLICT: 'the document changed since the version the request was based on',
  EF_INTERNAL: 'internal error',
  EF_TIMEOUT: 'no reply before the deadline',
  EF_BROKER_UNREACHABLE: 'cannot reach the MQTT broker',
  EF_BROKER_REFUSED: 'the MQTT broker refused the credentials',
  EF_CONFIG_INVALID: 'configuration is not valid',
  EF_PORT_IN_USE: 'a port the daemon needs is taken',
  EF_UNKNOWN_MODEL: 'no such model or model version',
  EF_MODEL_EXISTS: 'this model version already exists',
  EF_MODEL_INVALID: 'the model or its manifest is not valid',
  EF_STATUS_TRANSITION: 'the model version cannot move to that status',
  EF_SIGNATURE_INVALID: 'the manifest is unsigned, or not signed by a trusted fleet key',
  EF_ARTIFACT_MISSING: 'an artifact the manifest names is not in the store',
  EF_ARTIFACT_MISMATCH: 'an artifact does not match the size or sha256 its manifest gives',
  EF_ARTIFACT_TOO_LARGE: 'an artifact exceeds the size cap',
  EF_ARTIFACT_REFUSED: 'the artifact server refuses this artifact (unknown, or its version is quarantined)',
  EF_MODEL_EXPIRED: 'the model version is past its expiry',
  EF_DOWNGRADE_REFUSED: 'the version is below this device’s version floor',
  EF_RUNTIME_FAILED: 'the inference runtime failed to load or run the model',
  EF_GOLDEN_MISMATCH: 'the model’s outputs on its golden vectors are outside tolerance',
  EF_HEALTH_FAILED: 'the model version failed a health check',
  EF_INFER_INVALID: 'the inference request does not match the model’s signature',
  EF_MODEL_NOT_READY: 'no verified version of this model is being served',
  EF_DELTA_CORRUPT: 'the patch is corrupt (a checksum, a length or an instruction is wrong)',
  EF_DELTA_TRUNCATED: 'the patch ends before its end marker',
  EF_DELTA_TOO_LARGE: 'the patch, or the file it would produce, exceeds a size cap',
  EF_DELTA_WRONG_BASE: 'the patch was made against a different base file',
  EF_DELTA_UNSUPPORTED: 'the patch uses a format version or codec this build does not know',
  EF_DELTA_TARGET_MISMATCH: 'applying the patch did not produce the target sha256 it names',
  EF_PLAN_INVALID: 'the rollout plan is not valid (every error is listed)',
  EF_UNKNOWN_ROLLOUT: 'no such rollout',
  EF_ROLLOUT_CONFLICT: 'the rollout cannot do that now (its state, or another rollout of the model)',
  EF_SAFE_MODE: 'safe mode is on for these devices: rollouts wait until it is off',
  EF_BUNDLE_INVALID: 'the tensor bundle is malformed (magic, version, header, lengths, checksum or values)',
  EF_BUNDLE_TOO_LARGE: 'the tensor bundle exceeds a size cap (bytes, tensors or elements)',
  EF_TRAINING_FAILED: 'local training could not run or did not finish',
  EF_UNKNOWN_ROUND: 'no such federated round',
  EF_ROUND_CONFLICT: 'the round cannot do that now (its state, or another round of the model)',
} as const;

export type ErrorCode = keyof typeof ERRORS;

export const ERROR_CODES = Object.keys(ERRORS) as ErrorCode[];

/** An error with a catalog code; `message` adds specifics to the catalog text. */
export class EdgefleetError extends Error {
  readonly code: ErrorCode;
  readonly details: unknown;

  constructor(code: ErrorCode, message?: string, options?: { cause?: unknown; details?: unknown }) {
    super(message ?? ERRORS[code], options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'EdgefleetError';
    this.code = code;
    this.details = options?.details;
  }
}

export function isEdgefleetError(e: unknown): e is EdgefleetError {
  return e instanceof EdgefleetError;
}

/**
 * Process exit codes. Ranges per component, never reused: 0 success, 2 usage,
 * 10–29 the `edgefleet` CLI, 30–49 the agent, 50–69 the fleet server.
 */
export const EXIT = {
  OK: 0,
  USAGE: 2,
  CLI_BROKER_UNREACHABLE: 10,
  CLI_BROKER_REFUSED: 11,
  CLI_FORBIDDEN: 12,
  CLI_NOT_FOUND: 13,
  CLI_INVALID: 14,
  CLI_TIMEOUT: 15,
  CLI_SERVER_ERROR: 16,
  CLI_NO_CREDENTIALS: 17,
  /** `rollout watch`: the rollout it watched was halted or aborted. */
  CLI_ROLLOUT_FAILED: 18,
  /** `fl watch` (and `fl start`): the round ended failed or aborted. */
  CLI_ROUND_FAILED: 19,
  AGENT_CONFIG_INVALID: 30,
  AGENT_STATE_DIR: 31,
  AGENT_FATAL: 32,
  SERVER_CONFIG_INVALID: 50,
  SERVER_PORT_IN_USE: 51,
  SERVER_DATABASE: 52,
  SERVER_BROKER_UNREACHABLE: 53,
  SERVER_FATAL: 54,
} as const;

export type ExitCode = (typeof EXIT)[keyof typeof EXIT];

/** The catalog code `fn` throws (`'no code'` for an error without one), or null when it does not throw. */
export function codeOf(fn: () => unknown): string | null {
  try {
    fn();
    return null;
  } catch (err) {
    return (err as { code?: string }).code ?? 'no code';
  }
}

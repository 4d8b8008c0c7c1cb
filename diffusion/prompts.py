"""Prompts files, read the same way by every tool: one prompt per non-blank line, optionally `prompt<TAB>seed`."""

from diffusion.errors import UserError


def read_prompts_file(path: str) -> tuple[list[str], list[int | None]]:
  """(prompts, seeds) of a prompts file: one prompt per non-blank line, optionally `prompt<TAB>seed` (an integer);
  a line without a seed gets None (the run's --seed)."""
  try:
    with open(path, encoding='utf-8') as f:
      lines = [line.rstrip('\n') for line in f]
  except (OSError, UnicodeDecodeError) as e:
    raise UserError(f'cannot read the prompts file {path!r}: {e}') from None
  prompts, seeds = [], []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    text, tab, seed = line.rpartition('\t') if '\t' in line else (line, '', '')
    if tab:
      try:
        seeds.append(int(seed.strip()))
      except ValueError:
        raise UserError(f'{path}:{number}: the text after the tab must be an integer seed, got {seed!r}') from None
    else:
      seeds.append(None)
    if not text.strip():
      raise UserError(f'{path}:{number}: empty prompt')
    prompts.append(text.strip())
  return prompts, seeds

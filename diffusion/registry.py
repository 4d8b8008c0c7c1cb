"""One generic registry type for every name -> factory table (samplers, models, datasets, evaluators, ...).

SAMPLERS = Registry[Sampler]('sampler')
@SAMPLERS.register('ddim')
def ddim(...): ...
SAMPLERS.get('ddim')        # unknown names: UserError listing the known ones
"""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from diffusion.errors import UserError

T = TypeVar('T')


class Registry(Generic[T]):
  """Names -> entries of one kind. Registering a name twice is a bug (ValueError); looking up an unknown name is a
  user error (`UserError`) that lists the known names, so `--flag=typo` fails with one clear line."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator adding an entry under `name`; returns the entry unchanged."""

    def add(entry: T) -> T:
      self.add(name, entry)
      return entry

    return add

  def add(self, name: str, entry: T) -> None:
    if name in self._entries:
      raise ValueError(f'{self.kind} {name!r} is already registered; known: {", ".join(self.names())}')
    self._entries[name] = entry

  def get(self, name: str) -> T:
    if name not in self._entries:
      raise UserError(self.unknown(name))
    return self._entries[name]

  def unknown(self, name: object) -> str:
    """The message for an unknown name: what was asked for and every known name."""
    return f'unknown {self.kind} {name!r}; known: {", ".join(self.names())}'

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: object) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(self.names())

  def __len__(self) -> int:
    return len(self._entries)

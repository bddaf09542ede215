"""Name -> (function, default hyperparameters) registries, as in init2winit.

An unknown name fails listing the valid ones, so a typo in a config never
falls back to something silently.
"""
from typing import Any, Callable, Dict, NamedTuple

from lib.core.errors import UserError


class Entry(NamedTuple):
  fn: Callable[..., Any]
  defaults: Dict[str, Any]


class Registry:
  """A small named registry of implementations with their defaults."""

  def __init__(self, kind: str, config_key: str):
    self.kind = kind
    self.config_key = config_key
    self._entries: Dict[str, Entry] = {}

  def register(self, name: str, **defaults):
    def wrap(fn):
      if name in self._entries:
        raise ValueError(f'{self.kind} {name!r} registered twice')
      self._entries[name] = Entry(fn, dict(defaults))
      return fn
    return wrap

  def add(self, name: str, fn: Callable[..., Any], **defaults):
    self.register(name, **defaults)(fn)

  def get(self, name: str) -> Entry:
    if name not in self._entries:
      raise UserError(
          f'unknown {self.kind} {self.config_key}={name!r}; valid: '
          f'{", ".join(sorted(self._entries))}')
    return self._entries[name]

  def names(self):
    return sorted(self._entries)

  def __contains__(self, name):
    return name in self._entries

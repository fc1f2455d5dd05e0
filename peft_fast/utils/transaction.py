"""All-or-nothing model edits: an adapter operation that fails leaves the model as it was.

`rollback_on_error(module, ...)` records, for every module under the given roots, its attributes
(``__dict__``: sub-modules, parameters, buffers, hooks, the adapter dicts ``r``/``scaling``/...,
``peft_config``, active adapter, train/eval flag) and every parameter's ``requires_grad``. If the
body raises, each module gets back exactly those attributes, and every recorded container (dict,
list, set) gets back its contents *in place*, so objects shared between modules (the tuner's and
the base model's ``peft_config``) stay shared and references users hold see the restored state.
Modules created by the failed operation are dropped with the containers that held them.
Tensor values are not recorded: callers check shapes before they write into existing tensors.
"""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn

_CONTAINERS = (dict, list, set)


class _Snapshot:
    def __init__(self, roots: tuple[nn.Module, ...]):
        self.modules: list[tuple[nn.Module, dict]] = []
        self.containers: dict[int, tuple[object, object]] = {}
        seen: set[int] = set()
        for root in roots:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                attrs = dict(module.__dict__)
                self.modules.append((module, attrs))
                for value in attrs.values():
                    self._record(value)
        self.grads = [(p, p.requires_grad) for root in roots for p in root.parameters()]

    def _record(self, value, depth: int = 0) -> None:
        """Record a container's contents (and those of containers it holds, one level down:
        e.g. ``_forward_hooks`` or a config dict's values)."""
        if not isinstance(value, _CONTAINERS) or id(value) in self.containers:
            return
        self.containers[id(value)] = (value, list(value.items()) if isinstance(value, dict) else list(value))
        if depth == 0:
            for item in (value.values() if isinstance(value, dict) else value):
                self._record(item, depth + 1)

    def restore(self) -> None:
        for container, contents in self.containers.values():
            if isinstance(container, dict):
                container.clear()
                container.update(contents)
            elif isinstance(container, list):
                container[:] = contents
            else:
                container.clear()
                container.update(contents)
        for module, attrs in self.modules:
            for key in [k for k in module.__dict__ if k not in attrs]:
                del module.__dict__[key]
            module.__dict__.update(attrs)
        for p, requires_grad in self.grads:
            p.requires_grad_(requires_grad)


@contextmanager
def rollback_on_error(*roots: nn.Module):
    """Run the body; if it raises, put every module under `roots` back as it was and re-raise."""
    snapshot = _Snapshot(tuple(r for r in roots if r is not None))
    try:
        yield
    except BaseException:
        snapshot.restore()
        raise

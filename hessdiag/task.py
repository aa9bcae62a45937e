"""A task is a model, the data it is measured on, and its loss.

Every workflow (``spectrum``, ``align``, ``train``) takes a :class:`Task` instead of
assuming an image classifier: the data may be images, sequences, dicts of token ids or
graphs batched by their own ``collate_fn`` (:mod:`hessdiag.data`); the loss any of
:mod:`hessdiag.losses`; the model anything that maps the data's inputs to outputs the loss
takes. A checkpoint written by ``hessdiag train`` records its task (model spec and
keyword arguments, data spec, loss spec), so :func:`load_task` needs nothing but the
checkpoint; every part can be overridden.

A task is checked when it is made (:meth:`Task.check`): one forward pass on the first
batch, whose outputs must fit the loss and give a scalar. That catches a regression
target with a classification loss, a model whose output does not fit the targets and a
loss that does not reduce, before anything is computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hessdiag._errors import InputError, first_line
from hessdiag.checkpoints import CheckpointInfo, open_checkpoint
from hessdiag.data import DataInfo, batch_of, fixed_batches, load_dataset
from hessdiag.data.batching import to_device
from hessdiag.losses import Loss, check_loss_output, resolve_loss
from hessdiag.models import build_model
from hessdiag.outputs import chosen_part, describe_outputs, select_output
from hessdiag.settings import DataSettings


@dataclass(frozen=True)
class Task:
    """A model, the data it is measured on, and its loss (see the module docstring).

    ``model_kwargs`` are every keyword argument the model was built with (the data's facts
    included), so that ``build_model(model_spec, **model_kwargs)`` builds it again.
    ``checkpoint``, ``optimizer_state`` and ``extra`` come from the checkpoint it was
    loaded from, if any.
    """

    model: nn.Module
    data: DataInfo
    loss: Loss
    model_spec: str
    model_kwargs: dict[str, Any]
    checkpoint: CheckpointInfo | None = None
    optimizer_state: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def batches(self, batch_size: int, *, sharded: bool = False) -> Any:
        """The data's samples in order, in batches (see :func:`hessdiag.data.fixed_batches`);
        with ``sharded``, in a job of several processes, only this process's contiguous
        share of them (:func:`hessdiag.distributed.shard`)."""
        if sharded:
            from hessdiag.distributed import collective

            group = collective()
            if group is not None:
                return fixed_batches(self.data, batch_size, shard=group.shard)
        return fixed_batches(self.data, batch_size)

    def first_batch(self) -> tuple[Any, Any]:
        if self.data.batches is not None:
            return self.data.batches[0]
        return batch_of(self.data, range(min(len(self.data.dataset), 4)))

    def check(self) -> None:
        """One forward pass on the first batch (eval mode, no gradients, the model left as
        it was): the outputs must fit the loss and the loss must be a scalar."""
        inputs, targets = self.first_batch()
        device = next(iter(self.model.parameters()), torch.empty(0)).device
        inputs, targets = to_device(inputs, device), to_device(targets, device)
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                try:
                    outputs = call_model(self.model, inputs)
                except Exception as exc:  # the user's model on the user's data: anything
                    raise InputError(f"model {self.model_spec} cannot take the inputs of data "
                                     f"{self.data.name}: {type(exc).__name__}: "
                                     f"{first_line(exc)}", param="model") from exc
                if self.loss.output is not None:
                    select_output(outputs, self.loss.output)  # a wrong key: its own message
                try:
                    value = self.loss(outputs, targets)
                except InputError as exc:
                    part = None if self.loss.raw else chosen_part(outputs, self.loss.output)
                    if part is None:
                        raise
                    raise InputError(f"{exc} (the loss took {part} of the model's outputs, "
                                     f"{describe_outputs(outputs)}; --model-output KEY takes "
                                     "another)", param=exc.param) from exc
                except Exception as exc:
                    raise InputError(f"loss {self.loss.spec} cannot take the outputs of model "
                                     f"{self.model_spec} ({_shape(outputs)}) with the targets "
                                     f"of data {self.data.name} ({_shape(targets)}): "
                                     f"{type(exc).__name__}: {first_line(exc)}",
                                     param="loss") from exc
                check_loss_output(self.loss, value)
        finally:
            for module, flag in flags:
                module.training = flag

    def record(self) -> dict[str, Any]:
        """The task as results, checkpoints and the store record it (JSON-ready)."""
        out = {"model": self.model_spec, "model_kwargs": _jsonable(self.model_kwargs),
               "data": self.data.record(), "loss": self.loss.spec}
        if self.loss.output is not None:
            out["output"] = self.loss.output
        return out


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``: a tuple of inputs as positional arguments, a dict as keywords."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def _shape(obj: Any) -> str:
    return f"shape {tuple(obj.shape)}" if isinstance(obj, torch.Tensor) else describe_outputs(obj)


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def load_data(data: DataSettings, recorded: dict[str, Any] | None = None,
              where: str = "", *, trusted: bool = False) -> DataInfo:
    """The data of ``data``, falling back to a checkpoint's ``recorded`` data spec (and its
    root, when the spec is not overridden). A recorded factory spec is imported only when
    ``trusted`` (see :mod:`hessdiag.specs`)."""
    from hessdiag.specs import recorded as recorded_spec

    recorded = recorded or {}
    spec = data.spec or recorded_spec(recorded.get("spec"), what="data spec",
                                      source=where or "the checkpoint", option="data",
                                      trusted=trusted)
    if spec is None:
        raise InputError(f"{where or 'the checkpoint'} does not record its data: pass data "
                         "(see `hessdiag datasets`)", param="data")
    root = data.root if data.root is not None else (recorded.get("root") if not data.spec
                                                     else None)
    return load_dataset(spec, split=data.split, root=root, download=data.download,
                        samples=data.samples)


def load_task(checkpoint: str, *, data: DataSettings | None = None,
              model_spec: str | None = None, model_kwargs: dict[str, Any] | None = None,
              loss: str | None = None, output: str | None = None, unsafe: bool = False,
              allow_nonfinite: bool = False, check: bool = True) -> Task:
    """The task of a checkpoint: its model with its weights, its data (or ``data.spec``)
    and its loss (or ``loss``; else the data's default loss, else cross-entropy). Checks
    every part before returning (:meth:`Task.check`).

    The checkpoint is data, never code: a model, data or loss *factory* spec it records
    is imported only when the same part is named here (``model_spec``, ``data.spec``,
    ``loss``) or with ``unsafe``, which also lets a pickle run (see :mod:`hessdiag.specs`).
    Weights that are not finite are refused unless ``allow_nonfinite``. ``output`` (else
    the checkpoint's) chooses the model output the loss takes (:mod:`hessdiag.outputs`)."""
    from hessdiag.specs import recorded

    data = data or DataSettings()
    where = f"checkpoint {checkpoint}"
    opened = open_checkpoint(checkpoint, model_spec=model_spec, model_kwargs=model_kwargs,
                             unsafe=unsafe, allow_nonfinite=allow_nonfinite)
    info = load_data(data, opened.info.data, where=where, trusted=unsafe)
    loss = loss or recorded(opened.info.loss, what="loss spec", source=where, option="loss",
                            trusted=unsafe)
    resolved = resolve_loss(loss, default=info.loss or "cross-entropy",
                            output=output if output is not None else opened.info.output)
    model = opened.build_model(info.facts)
    kwargs = {**_facts_record(info), **opened.info.model_kwargs}
    task = Task(model=model, data=info, loss=resolved, model_spec=opened.info.model_spec,
                model_kwargs=kwargs, checkpoint=opened.info,
                optimizer_state=opened.optimizer_state, extra=opened.extra)
    if check:
        task.check()
    return task


def new_task(model_spec: str, data: DataInfo, *, loss: str | Loss | None = None,
             output: str | None = None, model_kwargs: dict[str, Any] | None = None,
             check: bool = True) -> Task:
    """A randomly initialised model for ``data`` (built from the data's facts and
    ``model_kwargs``) with ``loss`` (default: the data's, else cross-entropy) taken of the
    model's output ``output`` (:mod:`hessdiag.outputs`)."""
    kwargs = {**_facts_record(data), **(model_kwargs or {})}
    model = build_model(model_spec, **kwargs)
    task = Task(model=model, data=data, loss=resolve_loss(
        loss, default=data.loss or "cross-entropy", output=output), model_spec=model_spec,
        model_kwargs=kwargs)
    if check:
        task.check()
    return task


def _facts_record(data: DataInfo) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.facts.items()}

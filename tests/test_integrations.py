"""Sharpness where users train: SharpnessMonitor in a plain loop against a dense float64
Hessian, Lightning and Hugging Face Trainer callbacks against `hessdiag spectrum` on a
checkpoint of the same step, and the TensorBoard export read back event by event."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import dense_hessian
from conftest import run_cli as run
from model_zoo import _cnn_bn
from torch import nn

from hessdiag.monitor import SharpnessMonitor
from hessdiag.stability import dimensionless_threshold
from hessdiag.store import Store

KW = {"num_classes": 10, "in_shape": [1, 8, 8], "hidden": 8}


def _scalars(logdir, tag):
    """``(steps, values)`` of one tag from the TensorBoard event files under ``logdir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars(tag)
    return [e.step for e in events], np.array([e.value for e in events], dtype=np.float32)


def _event_dir(root):
    found = sorted({p.parent for p in root.rglob("events.out.tfevents.*")})
    assert len(found) == 1, found
    return found[0]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- the monitor


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, True)])
def test_monitor_matches_the_dense_hessian_and_leaves_training_alone(tmp_path, momentum,
                                                                     nesterov):
    """lambda_max and the stability ratio against eigvalsh of the float64 Hessian at the
    measured weights; with BatchNorm, training with the monitor ends exactly where it
    ends without (weights, running statistics, RNG), and the store/TensorBoard hold the
    returned rows."""
    pytest.importorskip("tensorboard")
    gen = torch.Generator().manual_seed(3)
    data = [(torch.randn(12, 1, 6, 6, generator=gen) * 2 + 0.5,
             torch.randint(0, 3, (12,), generator=gen)) for _ in range(4)]
    measure = [(torch.randn(10, 1, 6, 6, generator=gen), torch.randint(0, 3, (10,),
                                                                        generator=gen))]
    loss_fn = nn.CrossEntropyLoss()
    torch.manual_seed(0)
    start = _cnn_bn().double()
    measure = [(x.double(), y) for x, y in measure]
    data = [(x.double(), y) for x, y in data]

    def train(monitor_kwargs=None):
        model = copy.deepcopy(start)
        opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=momentum,
                              nesterov=nesterov)
        monitor = None if monitor_kwargs is None else SharpnessMonitor(
            model, loss_fn, measure, optimizer=opt, **monitor_kwargs)
        truths = {}
        torch.manual_seed(7)  # the loop draws from the global RNG: so must a probe not
        for step in range(5):
            x, y = data[step % 4]
            model.train()
            opt.zero_grad()
            loss = loss_fn(model(x + 0.01 * torch.randn_like(x)), y)
            loss.backward()
            opt.step()
            if monitor is not None and monitor.due(step + 1):
                truths[step + 1] = torch.linalg.eigvalsh(
                    dense_hessian(model, loss_fn, measure))[-1].item()
            if monitor is not None:
                monitor.step(step + 1, loss=float(loss.detach()))
        if monitor is not None:
            monitor.close()
        return model, torch.get_rng_state(), monitor, truths

    plain, rng_plain, _, _ = train()
    store = Store(tmp_path / "h.h5")
    model, rng, monitor, truths = train(dict(every=2, tol=1e-8, seed=0, store=store, run="bn",
                                             tensorboard=tmp_path / "tb", trace=True,
                                             trace_probes=10))
    for (name, a), b in zip(plain.state_dict().items(), model.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name  # running_mean/var and num_batches_tracked too
    assert torch.equal(rng_plain, rng)
    rows = monitor.history
    assert [r["step"] for r in rows] == [2, 4]
    c = dimensionless_threshold("nesterov" if nesterov else ("heavy-ball" if momentum
                                                              else "gd"), momentum)
    for row in rows:
        truth = truths[int(row["step"])]
        assert row["lambda_max_converged"] == 1
        assert abs(row["lambda_max"] - truth) <= max(row["lambda_max_residual"], 1e-9)
        assert row["threshold"] == pytest.approx(c / 0.3, rel=1e-12)
        assert row["stability"] == pytest.approx(truth * 0.3 / c, rel=1e-7)
        assert math.isnan(row["alignment"])  # plain SGD, alignment not asked for
        assert row["trace_stderr"] > 0 and row["trace_probes"] == 10
    # the store: a finished run that `show` and the flat tables read
    record = store.run("bn")
    assert record.attrs["status"] == "finished"
    assert record.arrays["sharpness/step"].tolist() == [2, 4]
    np.testing.assert_array_equal(record.arrays["sharpness/lambda_max"],
                                  [r["lambda_max"] for r in rows])
    assert record.arrays["metrics/step"].tolist() == [1, 2, 3, 4, 5]
    code, out, err = run(["show", tmp_path / "h.h5", "--json"])
    assert code == 0, err
    (shown,) = json.loads(out)["runs"]
    assert shown["run_id"] == "bn" and shown["stability"] == pytest.approx(rows[-1]["stability"])
    # TensorBoard: the same values at the same steps
    steps, values = _scalars(tmp_path / "tb", "hessdiag/lambda_max")
    assert steps == [2, 4]
    np.testing.assert_array_equal(values, np.float32([r["lambda_max"] for r in rows]))
    steps, values = _scalars(tmp_path / "tb", "hessdiag/stability_ratio")
    np.testing.assert_array_equal(values, np.float32([r["stability"] for r in rows]))


def test_monitor_adam_preconditioned_sharpness_and_sam_alignment():
    """Adam: the preconditioned lambda_max is that of D^-1/2 H D^-1/2 with Adam's own
    bias-corrected denominator; SAM: the alignment of its last perturbation with the
    exact top eigenvector."""
    from hessdiag.optim import SAM

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.99))
    monitor = SharpnessMonitor(model, loss_fn, (x, y), optimizer=opt, every=3, tol=1e-9)
    assert math.isnan(monitor.step(0)["preconditioned_lambda_max"])  # no Adam state yet
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    row = monitor.step(3)
    H = dense_hessian(model, loss_fn, [(x, y)])
    t = 3
    d = torch.cat([(1 - 0.8 ** t) * ((opt.state[p]["exp_avg_sq"] / (1 - 0.99 ** t)).sqrt()
                                     + 1e-8).reshape(-1) for p in model.parameters()])
    s = d.rsqrt()
    truth = torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1].item()
    assert row["preconditioned_lambda_max"] == pytest.approx(truth, rel=1e-7)
    assert row["threshold"] == pytest.approx((2 + 2 * 0.8) / (0.2 * 0.01))
    assert row["stability"] == pytest.approx(truth / row["threshold"], rel=1e-7)

    sam = SAM(model.parameters(), "sgd", rho=0.05, lr=0.1)
    monitor = SharpnessMonitor(model, loss_fn, (x, y), optimizer=sam, every=1, tol=1e-10)
    loss_fn(model(x), y).backward()
    sam.first_step(zero_grad=True)
    e = sam.perturbation_vector().clone()
    loss_fn(model(x), y).backward()
    sam.second_step(zero_grad=True)
    row = monitor.step(1)
    v = torch.linalg.eigh(dense_hessian(model, loss_fn, [(x, y)]))[1][:, -1]
    assert row["alignment"] == pytest.approx(abs(float(e @ v)) / float(e.norm()), abs=1e-6)
    assert row["stability"] == pytest.approx(row["lambda_max"] * 0.1 / 2, rel=1e-12)


def test_monitor_rejects_bad_settings(tmp_path):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="every"):
        SharpnessMonitor(model, nn.MSELoss(), (torch.zeros(1, 2), torch.zeros(1, 2)), every=0)
    with pytest.raises(ValueError, match="run="):
        SharpnessMonitor(model, nn.MSELoss(), (torch.zeros(1, 2), torch.zeros(1, 2)),
                         store=Store(tmp_path / "s.h5"))


# --------------------------------------------------------------------------- export


def test_export_tensorboard_reads_back_as_the_store_holds_it(tmp_path):
    pytest.importorskip("tensorboard")
    from hessdiag.train import TrainConfig, train

    store_path = tmp_path / "h.h5"
    cfg = TrainConfig(model="mlp", data="digits", model_kwargs={"hidden": 8}, samples=128,
                      batch_size=64, epochs=2, sharpness_every=1, sharpness_samples=64,
                      run_name="sgd", checkpoint_dir=str(tmp_path / "ck"))
    train(cfg, store=Store(store_path))
    out = tmp_path / "tb"
    code, _, err = run(["export", store_path, "--format", "tensorboard", "--out", out])
    assert code == 0, err
    record = Store(store_path).run("sgd")
    for table, column, tag in (("sharpness", "lambda_max", "hessdiag/lambda_max"),
                               ("sharpness", "stability", "hessdiag/stability_ratio"),
                               ("sharpness", "alignment", "hessdiag/alignment"),
                               ("metrics", "loss", "train/loss"),
                               ("metrics", "test_acc", "test/acc")):
        values = np.asarray(record.arrays[f"{table}/{column}"], dtype=float)
        steps = np.asarray(record.arrays[f"{table}/step"])
        keep = np.isfinite(values)
        assert keep.any()
        got_steps, got = _scalars(out / "sgd", tag)
        assert got_steps == steps[keep].tolist(), tag
        np.testing.assert_array_equal(got, values[keep].astype(np.float32), err_msg=tag)
    # an earlier export is not overwritten without --force; bad input: exit 2, one line
    code, _, err = run(["export", store_path, "--format", "tensorboard", "--out", out])
    assert code == 2 and "--force" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["export", store_path, "--format", "tensorboard", "--out", out,
                        "--force"])
    assert code == 0, err
    assert len(list((out / "sgd").glob("events.out.tfevents.*"))) == 1
    code, _, err = run(["export", store_path, "--format", "tensorboard"])
    assert code == 2 and "--out" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["export", store_path, "--format", "parquet"])
    assert code == 2 and "tensorboard" in err


# --------------------------------------------------------------------------- Lightning


def _spectrum_json(checkpoint, *extra):
    code, out, err = run(["spectrum", checkpoint, "--top-k", 1, "--seed", 0, "--tol", 1e-4,
                          "--json", "--store", checkpoint.parent / "spectrum.h5", *extra])
    assert code == 0, err
    return json.loads(out)


def test_lightning_callback_logs_lambda_max_that_spectrum_reproduces(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader, TensorDataset

    from hessdiag.checkpoints import save_checkpoint
    from hessdiag.data.digits import load_digits
    from hessdiag.integrations.lightning import SharpnessCallback
    from hessdiag.models import build_model

    x, y = load_digits("train").tensors
    saved = {}

    class Digits(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = build_model("mlp", **KW)

        def forward(self, inputs):
            return self.net(inputs)

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)

    class SaveAt(pl.Callback):  # a hessdiag checkpoint of the network at step 4
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 4 and 4 not in saved:
                saved[4] = tmp_path / "step-4.pt"
                save_checkpoint(saved[4], pl_module.net, model_spec="mlp", model_kwargs=KW,
                                step=4, data={"spec": "digits", "split": "train"})

    store = Store(tmp_path / "h.h5")
    callback = SharpnessCallback((x[:64], y[:64]), nn.CrossEntropyLoss(), every=2,
                                 store=store, run="lightning", seed=0, tol=1e-4)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", devices=1,
                         logger=TensorBoardLogger(tmp_path / "tb", name="run"),
                         callbacks=[callback, SaveAt()], enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False,
                         log_every_n_steps=1)
    loader = DataLoader(TensorDataset(x[:192], y[:192]), batch_size=32)
    trainer.fit(Digits(), loader)

    rows = callback.monitor.history
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    steps, values = _scalars(_event_dir(tmp_path / "tb"), "hessdiag/lambda_max")
    assert steps == [0, 2, 4, 6]
    np.testing.assert_array_equal(values, np.float32([r["lambda_max"] for r in rows]))
    record = store.run("lightning")
    assert record.attrs["status"] == "finished"
    assert record.arrays["sharpness/step"].tolist() == [0, 2, 4, 6]
    np.testing.assert_array_equal(record.arrays["sharpness/lambda_max"],
                                  [r["lambda_max"] for r in rows])
    assert record.arrays["sharpness/stability"][2] == pytest.approx(
        rows[2]["lambda_max"] * 0.5 / (2 * 1.9))
    assert record.arrays["metrics/step"].tolist() == [1, 2, 3, 4, 5, 6]
    # show, plot and report read the run as one of hessdiag train's
    code, out, err = run(["plot", tmp_path / "h.h5", "--what", "sharpness", "-o",
                          tmp_path / "s.png"])
    assert code == 0 and (tmp_path / "s.png").stat().st_size > 0, err
    code, out, err = run(["report", tmp_path / "h.h5", "-o", tmp_path / "r.html"])
    assert code == 0 and "lightning" in (tmp_path / "r.html").read_text(), err
    # the same lambda_max from the checkpoint of step 4, measured from scratch
    spectrum = _spectrum_json(saved[4], "--samples", 64)
    row = rows[2]
    bound = row["lambda_max_residual"] + spectrum["residuals"][0]
    assert abs(spectrum["eigenvalues"][0] - row["lambda_max"]) <= bound + 1e-6
    # the same seeded start vector and tolerance: the same Lanczos run, up to rounding
    assert abs(spectrum["eigenvalues"][0] - row["lambda_max"]) <= 1e-6 * row["lambda_max"]


# --------------------------------------------------------------------------- transformers

HF_TASK = '''
import torch
import transformers

from hessdiag.integrations.transformers import model_loss


def model(**kwargs):
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, bos_token_id=0, eos_token_id=0,
                                     attn_implementation="eager")
    return transformers.GPT2LMHeadModel(config)


def data(split="train"):
    return [({k: v for k, v in batch.items()}, batch["labels"]) for batch in BATCHES]


def loss():
    return model_loss


def batches():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (8, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[4:, 9:] = 0  # padded
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


BATCHES = [batches()]
'''


def test_transformers_callback_logs_lambda_max_that_spectrum_reproduces(tmp_path,
                                                                         monkeypatch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer's
    pytest.importorskip("tensorboard")
    from hessdiag.checkpoints import save_checkpoint
    from hessdiag.integrations.transformers import SharpnessCallback

    task = tmp_path / "hf_task.py"
    task.write_text(HF_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    import hf_task

    measure = hf_task.batches()
    gen = torch.Generator().manual_seed(1)
    train_set = [{"input_ids": ids, "labels": ids} for ids in
                 torch.randint(0, 50, (24, 12), generator=gen)]
    torch.manual_seed(0)
    model = hf_task.model()
    store = Store(tmp_path / "h.h5")
    callback = SharpnessCallback(measure, every=2, store=store, run="gpt2", seed=0,
                                 tol=1e-4)
    saved = {}

    class SaveAt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                saved[2] = tmp_path / "step-2.pt"
                save_checkpoint(saved[2], model, model_spec=f"{task}:model", step=2)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=8,
        learning_rate=1e-2, logging_steps=1, report_to=["tensorboard"],
        use_cpu=True, save_strategy="no",
        disable_tqdm=True, seed=0, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train_set,
                                   callbacks=[callback, SaveAt()])
    trainer.train()

    rows = callback.monitor.history
    assert [r["step"] for r in rows] == [0, 2, 4]
    # in the Trainer's own log, at the right steps, and through report_to
    logged = [(h["step"], h["hessdiag/lambda_max"]) for h in trainer.state.log_history
              if "hessdiag/lambda_max" in h]
    assert logged == [(int(r["step"]), r["lambda_max"]) for r in rows]
    steps, values = _scalars(_event_dir(tmp_path / "out"), "train/hessdiag/lambda_max")
    assert steps == [0, 2, 4]
    np.testing.assert_array_equal(values, np.float32([r["lambda_max"] for r in rows]))
    # AdamW: the preconditioned sharpness and its ratio once Adam has a state
    assert math.isnan(rows[0]["preconditioned_lambda_max"])
    assert rows[1]["preconditioned_lambda_max"] > 0 and rows[1]["stability"] > 0
    record = store.run("gpt2")
    assert record.attrs["status"] == "finished"
    np.testing.assert_array_equal(record.arrays["sharpness/lambda_max"],
                                  [r["lambda_max"] for r in rows])
    # the model's own loss at the checkpoint of step 2, measured from scratch by the CLI
    spectrum = _spectrum_json(saved[2], "--model", f"{task}:model", "--data", f"{task}:data",
                              "--loss", f"{task}:loss")
    row = rows[1]
    bound = row["lambda_max_residual"] + spectrum["residuals"][0]
    assert abs(spectrum["eigenvalues"][0] - row["lambda_max"]) <= bound + 1e-6
    # the same seeded start vector and tolerance: the same Lanczos run, up to rounding
    assert abs(spectrum["eigenvalues"][0] - row["lambda_max"]) <= 1e-6 * row["lambda_max"]
    assert spectrum["step"] == 2 and spectrum["converged"] == [True]


def test_transformers_loss_modes_are_the_models_loss_and_a_hessdiag_loss_on_logits(
        tmp_path, monkeypatch):
    """loss="model" is what GPT-2 computes (its shift, -100 ignored); "cross-entropy" is
    hessdiag's on the logits against unshifted labels, weighted by its terms."""
    transformers = pytest.importorskip("transformers")
    from hessdiag.integrations.transformers import measurement_batches

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0)).eval()
    ids = torch.randint(0, 50, (3, 6))
    labels = ids.clone()
    labels[2, 4:] = -100
    batch = {"input_ids": ids, "labels": labels}
    (pair,), model_loss = measurement_batches(batch, "model")
    (plain,), ce = measurement_batches(batch, "cross-entropy")
    assert "labels" in pair[0] and "labels" not in plain[0]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        shifted = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 50),
                                              labels[:, 1:].reshape(-1), ignore_index=-100)
        aligned = nn.functional.cross_entropy(logits.reshape(-1, 50), labels.reshape(-1),
                                              ignore_index=-100)
        assert float(model_loss(model(**pair[0]), pair[1])) == pytest.approx(float(shifted),
                                                                              rel=1e-6)
        assert float(ce(model(**plain[0]), plain[1])) == pytest.approx(float(aligned),
                                                                       rel=1e-6)
    assert ce.batch_weight(plain[0], plain[1]) == 16  # 18 tokens, 2 of them padding
    with pytest.raises(ValueError, match="labels"):
        measurement_batches({"input_ids": ids}, "model")


# --------------------------------------------------------------------------- the pages

PAGES = {"tensorboard.md": ("tensorboard",), "lightning.md": ("lightning", "tensorboard"),
         "transformers.md": ("transformers", "accelerate")}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_integration_pages_run_as_written(page, tmp_path, monkeypatch, capsys):
    """Every python block of docs/integrations/PAGE, in order, in a fresh directory."""
    import re
    from pathlib import Path

    for module in PAGES[page]:
        pytest.importorskip(module)
    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations" / page).read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        exec(compile(block, page, "exec"), namespace)  # noqa: S102
    printed = capsys.readouterr().out
    assert "lambda_max" in printed or "values" in printed or printed.count("\n") >= 3
    if page == "tensorboard.md":
        record = Store(tmp_path / "hessdiag.h5").run("digits-sgd")
        assert record.attrs["status"] == "finished"
        assert record.arrays["sharpness/step"].tolist() == [0, 5, 10, 15, 20]
        assert (tmp_path / "tb-export" / "digits-sgd").is_dir()


@pytest.mark.parametrize("framework", ["lightning", "transformers"])
def test_without_the_framework_the_module_imports_and_the_callback_says_what_to_install(
        framework, monkeypatch):
    import importlib.util
    import sys

    for name in (framework, f"{framework}.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    spec = importlib.util.find_spec(f"hessdiag.integrations.{framework}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a fresh copy, the installed one left alone
    with pytest.raises(ImportError, match=rf"hessdiag\[{framework}\]"):
        if framework == "lightning":
            module.SharpnessCallback((torch.zeros(1, 2), torch.zeros(1)), nn.MSELoss())
        else:
            module.SharpnessCallback({"input_ids": torch.zeros(1, 2), "labels": torch.zeros(1, 2)})

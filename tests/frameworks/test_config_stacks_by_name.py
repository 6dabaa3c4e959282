"""Mechanic by name: `mechanic_fast.optim`'s classes in the config-driven stacks users train with (Hydra,
torchtune, LightningCLI, transformers' Trainer), each resuming bit-identically, and the effective lr in
their logs. Needs the `.[integration]` extra; each framework's test skips where it does not import."""

from __future__ import annotations

import copy
import pickle
import pydoc

import pytest
import torch
from helpers import regression_data, small_mlp

import mechanic_fast.optim as mo
from mechanic_fast import is_mechanized, mechanic_log_values, mechanic_scale, mechanize


def _train(model, opt, steps, start=0):
    x, y = regression_data()
    for t in range(start, steps):
        opt.zero_grad()
        ((model(x[t % 4 * 16 : t % 4 * 16 + 16]) - y[t % 4 * 16 : t % 4 * 16 + 16]) ** 2).mean().backward()
        opt.step()


def _resumes_exactly(make_opt):
    """Trained 12 steps straight, and 6 + saved + loaded into a new one + 6: the same bits."""
    model_a = small_mlp()
    opt_a = make_opt(model_a.parameters())
    _train(model_a, opt_a, 12)
    model_b = small_mlp()
    opt_b = make_opt(model_b.parameters())
    _train(model_b, opt_b, 6)
    saved = copy.deepcopy(opt_b.state_dict())
    opt_c = make_opt(model_b.parameters())
    opt_c.load_state_dict(saved)
    _train(model_b, opt_c, 12, start=6)
    assert mechanic_scale(opt_a) > 1e-6
    assert torch.equal(mechanic_scale(opt_a), mechanic_scale(opt_c))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------- the named classes
def test_every_optimizer_mechanic_supports_has_a_named_class():
    for name in dir(torch.optim):
        base = getattr(torch.optim, name)
        if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)):
            continue
        if base in (torch.optim.Optimizer, torch.optim.LBFGS, torch.optim.SparseAdam):
            assert not hasattr(mo, name) or name == "Optimizer" and not hasattr(mo, name)
            continue
        cls = getattr(mo, name)
        assert cls.__module__ == "mechanic_fast.optim" and cls.__qualname__ == name
        assert issubclass(cls, base) and mechanize(base) is cls  # mechanize gives that same class
        assert pydoc.locate(f"mechanic_fast.optim.{name}") is cls  # what a config's class path resolves


def test_options_are_keywords_beside_the_bases_and_checked():
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = mo.AdamW(params, lr=1e-2, betas=(0.8, 0.9), mechanic_s_decay=1.0, mechanic_betas=(0.9, 0.99))
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)  # Adam's
    assert opt._mechanic_spec.config.betas == (0.9, 0.99) and opt._mechanic_spec.config.s_decay == 1.0
    assert mo.AdamW(params)._mechanic_spec.config.s_decay is None  # the class's own options untouched
    with pytest.raises(TypeError, match="unknown Mechanic option.*mechanic_sdecay"):
        mo.AdamW(params, mechanic_sdecay=1.0)
    with pytest.raises(ValueError, match="s_init"):
        mo.SGD(params, lr=0.1, mechanic_s_init=-1.0)
    text = pydoc.render_doc(mo.AdamW)
    assert "mechanic_s_decay" in text and "weight_decay" in text and "amsgrad" in text


def test_named_instances_pickle_deepcopy_and_resume_with_their_options():
    params = [torch.nn.Parameter(torch.ones(3))]
    opt = mo.SGD(params, lr=0.1, momentum=0.9, mechanic_s_decay=2.0)
    for clone in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert type(clone) is mo.SGD and clone._mechanic_spec.config.s_decay == 2.0
    _resumes_exactly(lambda ps: mo.AdamW(ps, lr=3e-3, weight_decay=0.01, mechanic_s_decay=1.0))


def test_log_values_are_tensors_and_per_group_where_lrs_differ():
    model = small_mlp()
    groups = [{"params": model[0].parameters(), "lr": 1e-2}, {"params": model[2].parameters(), "lr": 1e-3}]
    opt = mo.Adam(groups)
    _train(model, opt, 3)
    values = mechanic_log_values(opt)
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in values.values())
    assert torch.equal(values["mechanic/scale"], mechanic_scale(opt))
    assert values["mechanic/effective_lr/group_1"] == pytest.approx(values["mechanic/scale"].item() * 1e-3)


# ---------------------------------------------------------------------------------------------- Hydra
def test_hydra_instantiate_by_target():
    hydra_utils = pytest.importorskip("hydra.utils")
    config = {
        "_target_": "mechanic_fast.optim.AdamW",
        "lr": 3e-3,
        "weight_decay": 0.01,
        "mechanic_s_decay": 1.0,
    }
    opt = hydra_utils.instantiate(config, params=list(small_mlp().parameters()))
    assert type(opt) is mo.AdamW and opt._mechanic_spec.config.s_decay == 1.0
    _resumes_exactly(lambda ps: hydra_utils.instantiate(config, params=list(ps)))


# ------------------------------------------------------------------------------------------ torchtune
def test_torchtune_config_instantiate_by_component():
    try:
        from omegaconf import OmegaConf
        from torchtune import config as tune_config
    except Exception as error:  # torchtune's import needs a torchao that matches it
        pytest.skip(f"torchtune does not import here: {error}")
    config = OmegaConf.create(
        {"_component_": "mechanic_fast.optim.AdamW", "lr": 3e-3, "mechanic_s_decay": 1.0}
    )
    opt = tune_config.instantiate(config, list(small_mlp().parameters()))
    assert type(opt) is mo.AdamW and opt._mechanic_spec.config.s_decay == 1.0
    _resumes_exactly(lambda ps: tune_config.instantiate(config, list(ps)))


# -------------------------------------------------------------------------------------- transformers
@pytest.mark.slow
def test_transformers_trainer_by_class_logs_the_effective_lr_and_resumes_exactly(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mechanic_fast.integrations.transformers import MechanicCallback

    x, y = regression_data(48)
    data = [{"x": a, "labels": b} for a, b in zip(x, y)]

    class Regressor(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = small_mlp()

        def forward(self, x, labels):
            return {"loss": ((self.net(x) - labels) ** 2).mean()}

    def run(resume=None):
        transformers.set_seed(0)
        model = Regressor()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"), max_steps=20, save_steps=10, per_device_train_batch_size=8,
            report_to=[], use_cpu=True, seed=0, logging_steps=5, disable_tqdm=True,
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=model,
            args=args,
            train_dataset=data,
            optimizer_cls_and_kwargs=(mo.AdamW, {"lr": 3e-3, "mechanic_s_decay": 1.0}),
        )
        MechanicCallback.attach(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    model_a, trainer_a = run()
    model_b, trainer_b = run(resume=str(tmp_path / "out" / "checkpoint-10"))
    assert (
        type(
            trainer_a.optimizer.optimizer
            if hasattr(trainer_a.optimizer, "optimizer")
            else trainer_a.optimizer
        )
        is mo.AdamW
    )
    logged = [e for e in trainer_a.state.log_history if "mechanic/effective_lr" in e and "learning_rate" in e]
    assert len(logged) == 4  # every logging step (and the run's closing summary)
    last = logged[0]  # (at the last step a decayed-to-0 lr has moved on from the one logged)
    assert last["mechanic/effective_lr"] == pytest.approx(
        last["mechanic/scale"] * last["learning_rate"], rel=1e-5
    )
    assert torch.equal(mechanic_scale(trainer_a.optimizer), mechanic_scale(trainer_b.optimizer))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ Lightning
@pytest.mark.slow
def test_lightning_cli_names_the_optimizer_in_yaml_logs_the_effective_lr_and_resumes_exactly(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    cli_module = pytest.importorskip("lightning.pytorch.cli")
    pytest.importorskip("jsonargparse")
    from mechanic_fast.integrations.lightning import MechanicCallback

    x, y = regression_data()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = small_mlp()

        def training_step(self, batch, _):
            xb, yb = batch
            return ((self.net(xb) - yb) ** 2).mean()

        def train_dataloader(self):
            # one batch per epoch: Lightning's resume repeats a batch at an epoch boundary
            return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)

    seen = []

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen.append(dict(trainer.callback_metrics))

    config = tmp_path / "config.yaml"
    config.write_text(
        "optimizer:\n"
        "  class_path: mechanic_fast.optim.AdamW\n"
        "  init_args:\n"
        "    lr: 0.003\n"
        "    mechanic_s_decay: 1.0\n"
        "trainer:\n"
        "  max_steps: 16\n"
        "  accelerator: cpu\n"
        "  logger: false\n"
        "  enable_progress_bar: false\n"
        "  enable_model_summary: false\n"
    )

    def run(*extra, callbacks=()):
        torch.manual_seed(0)
        cli = cli_module.LightningCLI(
            Module,
            run=False,
            args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}", *extra],
            trainer_defaults={"callbacks": [MechanicCallback(), *callbacks]},
            save_config_kwargs={"overwrite": True},
        )
        return cli

    first = run()
    checkpoint = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1, filename="{step}"
    )
    first.trainer.callbacks.append(checkpoint)
    first.trainer.callbacks.append(Recorder())
    first.trainer.fit(first.model)
    second = run("--trainer.enable_checkpointing=false")
    second.trainer.fit(second.model, ckpt_path=str(tmp_path / "ckpt" / "step=8.ckpt"))
    opt_a, opt_b = first.trainer.optimizers[0], second.trainer.optimizers[0]
    inner = getattr(opt_a, "optimizer", opt_a)  # Lightning's wrapper, where there is one
    assert is_mechanized(opt_a) and type(inner) is mo.AdamW and inner._mechanic_spec.config.s_decay == 1.0
    assert "mechanic/effective_lr" in seen[-1] and "mechanic/scale" in seen[-1]
    assert torch.equal(mechanic_scale(opt_a), mechanic_scale(opt_b))
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)

"""Framework resumes stay bit-exact against their uninterrupted runs: Hugging Face transformers' Trainer,
accelerate, PyTorch Lightning and timm, on tiny models built from code or configs (no downloads).

Run with the `.[integration]` extra installed; each test skips when its framework is missing.
"""

from __future__ import annotations

import pytest
import torch
from helpers import regression_data, small_mlp

from mechanic_fast import is_mechanized, mechanic_scale, mechanize

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _same(model_a, model_b, opt_a, opt_b):
    assert mechanic_scale(opt_a) > 1e-5  # the tuner moved 10x from its start (1e-6): its state matters
    assert torch.equal(mechanic_scale(opt_a), mechanic_scale(opt_b))
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------- accelerate
def test_accelerate_save_state_and_load_state_resume_bit_exactly(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    x, y = regression_data()

    def run(start, stop, load=None, save=None):
        acc = accelerate.Accelerator(cpu=True)
        model = small_mlp()
        opt = mechanize(torch.optim.AdamW)(model.parameters(), lr=3e-3)
        model, opt = acc.prepare(model, opt)
        assert is_mechanized(opt)  # through AcceleratedOptimizer
        if load:
            acc.load_state(load)
        for t in range(start, stop):
            if save and t == save[0]:
                acc.save_state(save[1])
            idx = slice(8 * (t % 8), 8 * (t % 8) + 8)
            opt.zero_grad()
            acc.backward(((model(x[idx]) - y[idx]) ** 2).mean())
            opt.step()
        return model, opt

    ckpt = str(tmp_path / "acc")
    model_a, opt_a = run(0, 20, save=(10, ckpt))
    model_b, opt_b = run(10, 20, load=ckpt)
    _same(model_a, model_b, opt_a, opt_b)


# ------------------------------------------------------------------------------------------- lightning
def test_lightning_checkpoint_resume_is_bit_exact(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    x, y = regression_data()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = small_mlp()

        def training_step(self, batch, _):
            opt = self.optimizers()  # Lightning's wrapper
            assert is_mechanized(opt)
            # effective lr, for frameworks that log only the base lr:
            self.log("effective_lr", mechanic_scale(opt) * opt.param_groups[0]["lr"])
            xb, yb = batch
            return ((self.net(xb) - yb) ** 2).mean()

        def configure_optimizers(self):
            return mechanize(torch.optim.AdamW)(self.parameters(), lr=3e-3)

    def loader():
        data = torch.utils.data.TensorDataset(x, y)
        # one batch per epoch: Lightning's resume repeats a batch at an epoch boundary (a data-order
        # quirk of its loop, not ours), so every step sees the same batch
        return torch.utils.data.DataLoader(data, batch_size=64, shuffle=False)

    def trainer(**kwargs):
        return pl.Trainer(
            max_steps=24,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(tmp_path),
            **kwargs,
        )

    ckpt_cb = pl.callbacks.ModelCheckpoint(
        dirpath=str(tmp_path / "ckpt"), every_n_epochs=1, save_top_k=-1, filename="{step}"
    )
    first = Module()
    t1 = trainer(callbacks=[ckpt_cb])
    t1.fit(first, loader())
    second = Module()
    t2 = trainer(enable_checkpointing=False)
    t2.fit(second, loader(), ckpt_path=str(tmp_path / "ckpt" / "step=8.ckpt"))
    _same(first, second, t1.optimizers[0], t2.optimizers[0])


# ------------------------------------------------------------------------------------ transformers
def test_transformers_trainer_resume_from_checkpoint_is_bit_exact(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=2,
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (48, 12), generator=gen)
    labels = (ids[:, 0] % 2).long()
    data = [{"input_ids": i, "labels": label} for i, label in zip(ids, labels)]

    def run(resume=None):
        transformers.set_seed(0)
        model = transformers.BertForSequenceClassification(config)
        opt = mechanize(torch.optim.AdamW)(model.parameters(), lr=1e-3)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "out"),
            max_steps=20,
            save_steps=10,
            per_device_train_batch_size=8,
            report_to=[],
            use_cpu=True,
            seed=0,
            logging_strategy="no",
            disable_tqdm=True,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None))
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer.optimizer

    model_a, opt_a = run()
    model_b, opt_b = run(resume=str(tmp_path / "out" / "checkpoint-10"))
    _same(model_a, model_b, opt_a, opt_b)


# --------------------------------------------------------------------------------------------- timm
def _import_timm():
    try:
        import timm.optim  # timm imports torchvision, whose PyPI wheels are CUDA builds
    except Exception as exc:  # noqa: BLE001 (ImportError, or torchvision's own RuntimeError)
        pytest.skip(f"timm cannot be imported here: {exc!r}")
    return timm


@pytest.mark.parametrize("name", ["adamw", "novograd"])
def test_timm_optimizer_mechanized_as_instance_resumes_bit_exactly(name, tmp_path):
    timm = _import_timm()
    x, y = regression_data()

    def run(start, stop, load=None):
        model = small_mlp()
        opt = mechanize(timm.optim.create_optimizer_v2(model, name, lr=3e-3, weight_decay=0.01))
        if load:
            model.load_state_dict(load["model"])
            opt.load_state_dict(load["opt"])
        for t in range(start, stop):
            if t == 10 and load is None:
                torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "c.pt")
            idx = slice(8 * (t % 8), 8 * (t % 8) + 8)
            opt.zero_grad()
            ((model(x[idx]) - y[idx]) ** 2).mean().backward()
            opt.step()
        return model, opt

    model_a, opt_a = run(0, 20)
    model_b, opt_b = run(10, 20, load=torch.load(tmp_path / "c.pt", weights_only=True))
    _same(model_a, model_b, opt_a, opt_b)

"""The small training engine (spfbench/engine.py) the world's training loops share: atomic saves, the
resumable checkpoint and its argument check, the JSONL log, the LR schedule, the EMA and the step loop."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from spfbench import engine
from spfbench.errors import SpfbenchError


def test_warmup_cosine_by_hand():
    f = engine.warmup_cosine(4, 14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(9) == pytest.approx(0.1 + 0.9 * 0.5) and f(14) == pytest.approx(0.1) and f(40) == pytest.approx(0.1)
    assert engine.warmup_cosine(4, 14, floor=0.0)(14) == pytest.approx(0.0, abs=1e-12)
    assert [engine.warmup_cosine(2, 10, "constant")(s) for s in (0, 1, 2, 9, 50)] == [0.5, 1.0, 1.0, 1.0, 1.0]


def test_ema_warms_up_then_averages_and_copies_back():
    m = torch.nn.Linear(2, 1)
    ema = engine.EMA([m], decay=0.5)
    start = [p.detach().clone() for p in m.parameters()]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    ema.update(0)  # warm-up decay min(0.5, 1/10) = 0.1: 0.1 x old + 0.9 x new
    assert all(torch.allclose(s, a + 0.9) for s, a in zip(ema.shadow, start))
    ema.update(100)  # decay 0.5
    assert all(torch.allclose(s, a + 0.95) for s, a in zip(ema.shadow, start))
    ema.copy_to([m])
    assert all(torch.equal(p, s) for p, s in zip(m.parameters(), ema.shadow))
    with pytest.raises(SpfbenchError, match="not this architecture's checkpoint"):
        engine.copy_params([torch.nn.Linear(3, 1)], ema.shadow[:1])


def test_atomic_saves_leave_only_the_file(tmp_path):
    engine.atomic_torch_save({"x": torch.arange(3)}, tmp_path / "a" / "ck.pt")
    assert torch.equal(torch.load(tmp_path / "a" / "ck.pt", weights_only=True)["x"], torch.arange(3))
    from safetensors.torch import load_file, safe_open

    engine.atomic_save_safetensors({"w": torch.ones(2, dtype=torch.float16)}, tmp_path / "b" / "w.safetensors", {"format": "x"})
    assert torch.equal(load_file(str(tmp_path / "b" / "w.safetensors"))["w"], torch.ones(2, dtype=torch.float16))
    with safe_open(str(tmp_path / "b" / "w.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "x"}
    assert os.stat(tmp_path / "b" / "w.safetensors").st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["ck.pt", "w.safetensors"]


def test_check_same_args_names_what_differs_and_ignores_speed():
    engine.check_same_args({"lr": 1, "threads": 2, "stop_at": 3}, {"lr": 1, "threads": 8}, "VAE", "here")
    with pytest.raises(SpfbenchError, match=r"here holds a VAE checkpoint of another training \(lr: 1 there, 2 now; n: None there, 4 now\)"):
        engine.check_same_args({"lr": 1}, {"lr": 2, "n": 4}, "VAE", "here")


def _run(folder, steps, stop_at=None, log=print):
    """A tiny resumable training with the engine: a linear model fit to noise."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, engine.warmup_cosine(2, steps))
    g = torch.Generator().manual_seed(0)
    args = {"steps": steps}
    ck, step, _ = engine.resume(folder, args, "toy", opt, sched, g, log)
    if ck is not None:
        model.load_state_dict(ck["model"])

    def one_step(step):
        x = torch.randn(4, 3, generator=g)
        loss = (model(x) - 1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return {"loss": loss.item(), "half": loss.item() / 2}

    def save(step):
        engine.atomic_torch_save(engine.checkpoint(args, step, 0.0, opt, sched, g, model=model.state_dict()), folder / engine.CHECKPOINT)

    rows = []
    step = engine.run_steps(one_step, step, steps, sched=sched, stop_at=stop_at, log_every=3, log_path=folder / engine.LOG,
                            on_log=rows.append, save=save, ckpt_every=2)
    return model, step, rows


def test_step_loop_logs_checkpoints_and_resumes_to_the_same_weights(tmp_path):
    (tmp_path / "a").mkdir()
    full, step, rows = _run(tmp_path / "a", 7)
    assert step == 7 and [r["step"] for r in rows] == [3, 6, 7]  # every log_every steps and at the end
    assert all(r["half"] == pytest.approx(r["loss"] / 2) and set(r) == {"step", "loss", "half", "lr", "seconds"} for r in rows)
    assert [json.loads(ln) for ln in (tmp_path / "a" / engine.LOG).read_text().splitlines()] == rows
    (tmp_path / "b").mkdir()
    _, step, _ = _run(tmp_path / "b", 7, stop_at=5)  # "killed" after step 5: checkpoints at 2, 4 and where it stopped
    assert step == 5 and torch.load(tmp_path / "b" / engine.CHECKPOINT, weights_only=True)["step"] == 5
    said = []
    resumed, step, _ = _run(tmp_path / "b", 7, log=said.append)
    assert step == 7 and said == ["resuming toy training at step 5"]
    assert all(torch.equal(a, b) for a, b in zip(full.state_dict().values(), resumed.state_dict().values()))
    logged = [json.loads(ln) for ln in (tmp_path / "b" / engine.LOG).read_text().splitlines()]
    assert [r["step"] for r in logged] == [3, 5, 6, 7]  # the stopped run's rows, then the resumed run's
    with pytest.raises(SpfbenchError, match="another training"):
        _run(tmp_path / "b", 9)


def test_trim_drops_rows_after_the_checkpoint(tmp_path):
    log = tmp_path / "log.jsonl"
    for s in (1, 2, 3, 4):
        engine.append_jsonl(log, {"step": s, "loss": math.pi})
    engine.trim_jsonl(log, 2)
    assert [json.loads(ln) for ln in log.read_text().splitlines()] == [{"step": 1, "loss": math.pi}, {"step": 2, "loss": math.pi}]
    engine.trim_jsonl(tmp_path / "none.jsonl", 2)  # no log: nothing to do
    assert not (tmp_path / "none.jsonl").exists()

import pytest
import torch

from distillscale.config import TrainConfig
from distillscale.train.loop import NonFiniteLossError, lr_at, train


def _problem(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(256, 8)
    w = torch.randn(8, 1)
    y = x @ w
    model = torch.nn.Linear(8, 1)
    return model, x, y


def _loss(model, x, y):
    def fn(idx, step):
        return torch.nn.functional.mse_loss(model(x[idx]), y[idx]), {}
    return fn


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=40, batch_size=16, lr=0.05, min_lr=0.005, warmup_steps=5,
                      checkpoint_every=10, log_every=10, eval_every=10)
    m1, x, y = _problem()
    train(m1, list(m1.parameters()), _loss(m1, x, y), 256, cfg, 0, tmp_path / "a.pt", "a")

    m2, _, _ = _problem()
    short = cfg.model_copy(update={"steps": 40})
    ck = tmp_path / "b.pt"

    class Killed(Exception):
        pass

    def dying(idx, step):
        if step == 25:
            raise Killed
        return _loss(m2, x, y)(idx, step)

    with pytest.raises(Killed):
        train(m2, list(m2.parameters()), dying, 256, short, 0, ck, "b")
    assert torch.load(ck, weights_only=False)["step"] == 20
    m3, _, _ = _problem(seed=123)  # different init: everything must come from the checkpoint
    res = train(m3, list(m3.parameters()), _loss(m3, x, y), 256, short, 0, ck, "b")
    assert res.resumed_from == 20
    for a, b in zip(m1.parameters(), m3.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_non_finite_loss_stops_with_step(tmp_path):
    m, x, y = _problem()

    def bad(idx, step):
        loss = torch.nn.functional.mse_loss(m(x[idx]), y[idx])
        return (loss * float("nan") if step == 3 else loss), {}

    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(m, list(m.parameters()), bad, 256, TrainConfig(steps=10), 0, tmp_path / "c.pt", "c")


def test_lr_schedule_warmup_and_decay():
    cfg = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)
    assert lr_at(50, cfg) < lr_at(20, cfg)


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    base = TrainConfig(steps=15, batch_size=16, lr=0.05, min_lr=0.005, warmup_steps=2,
                       checkpoint_every=100, log_every=5, eval_every=100)
    m1, x, y = _problem()
    r1 = train(m1, list(m1.parameters()), _loss(m1, x, y), 256, base, 0, tmp_path / "a.pt", "a")
    m2, _, _ = _problem()
    calls = []

    def counted(idx, step):
        calls.append(len(idx))
        return _loss(m2, x, y)(idx, step)

    acc = base.model_copy(update={"grad_accum_steps": 4})
    r2 = train(m2, list(m2.parameters()), counted, 256, acc, 0, tmp_path / "b.pt", "b")
    assert calls == [4] * 60  # 15 steps x 4 micro-batches of 4 examples
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(a, b, atol=1e-5)
    assert [h["loss"] for h in r1.history] == pytest.approx([h["loss"] for h in r2.history],
                                                             rel=1e-5)


def test_tensorboard_scalars_continue_after_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(steps=30, batch_size=16, lr=0.05, min_lr=0.005, warmup_steps=2,
                      checkpoint_every=10, log_every=5, eval_every=100)
    m, x, y = _problem()
    tb, ck = tmp_path / "tb", tmp_path / "c.pt"

    class Killed(Exception):
        pass

    def dying(idx, step):
        if step == 17:  # steps 15 was logged after the last checkpoint (10)
            raise Killed
        return _loss(m, x, y)(idx, step)

    with pytest.raises(Killed):
        train(m, list(m.parameters()), dying, 256, cfg, 0, ck, "kd", tensorboard_dir=tb)
    res = train(m, list(m.parameters()), _loss(m, x, y), 256, cfg, 0, ck, "kd",
                tensorboard_dir=tb)
    assert res.resumed_from == 10
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert {"kd/loss", "kd/lr"} <= set(acc.Tags()["scalars"])
    steps = [e.step for e in acc.Scalars("kd/loss")]
    assert steps == [5, 10, 15, 20, 25, 30]  # one curve, no duplicate of step 15
    assert acc.Scalars("kd/loss")[-1].value == pytest.approx(res.history[-1]["loss"])

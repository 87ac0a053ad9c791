import logging
import warnings

from distillscale.compat.logs import quiet_known_noise


def test_known_noise_is_dropped_and_everything_else_kept(caplog):
    quiet_known_noise()
    quiet_known_noise()  # idempotent: one filter per logger
    bridge = logging.getLogger("megatron.bridge.utils.import_utils")
    assert len(bridge.filters) == 1
    bridge.setLevel(logging.INFO)  # what Megatron-Bridge does to its own logger at import
    with caplog.at_level(logging.INFO, logger="megatron.bridge.utils.import_utils"):
        bridge.info("Import of GroupedLinear from transformer_engine.pytorch failed with: Trace")
        bridge.info("Import of numpy succeeded")
        logging.getLogger("megatron.core.models.gpt.gpt_model").warning(
            "GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
    assert [r.getMessage() for r in caplog.records] == ["Import of numpy succeeded"]
    assert not logging.getLogger("lm_eval.evaluator").isEnabledFor(logging.INFO)
    assert logging.getLogger("lm_eval.evaluator").isEnabledFor(logging.WARNING)

    with warnings.catch_warnings(record=True) as seen:
        quiet_known_noise()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back", UserWarning)
        warnings.warn("Teacher's Module `ColumnParallelLinear` already has an intermediate "
                      "output stored.", UserWarning)
        warnings.warn("Per-rank checkpoint runs/q/importance/.a-n128-s0.partial/scores0.pth not "
                      "found, falling back to runs/q/importance/.a.partial/scores.pth. Ensure "
                      "world size matches the original run.", UserWarning)
        warnings.warn("Checkpoint runs/q/importance/.a.partial/scores.pth does not exist! "
                      "Initializing from scratch.", UserWarning)
        warnings.warn("the student diverged", UserWarning)
    assert [str(w.message) for w in seen] == ["the student diverged"]


def test_ray_token_note_is_dropped_but_its_auth_errors_are_kept():
    quiet_known_noise()
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    log = logging.getLogger("ray._private.authentication.authentication_token_setup")
    handler = Keep(level=logging.WARNING)
    log.addHandler(handler)  # Ray's loggers may not propagate to the root logger
    try:
        log.warning("Token authentication is enabled for this Ray cluster. Set "
                    "RAY_AUTH_MODE=disabled to opt out.")
        log.warning("Token authentication is enabled but no authentication token was found")
    finally:
        log.removeHandler(handler)
    assert seen == ["Token authentication is enabled but no authentication token was found"]

"""Known, harmless messages of the pinned stack, kept out of run logs.

A quickstart printed ~300 lines of which ~250 were these, repeated for every model built or
loaded; the stage's own progress and tables were lost among them. Each filter below names the
exact message, where it comes from, and why it is harmless here. Everything else (including
other warnings from the same libraries) still shows. `distillscale -v ...` shows them all.
"""

from __future__ import annotations

import logging
import re
import warnings

# (message regex, why it is harmless)
_WARNINGS = (
    (r"Transformer Engine and Apex are not installed",
     "megatron-core on CPU: the torch fallbacks are what the CPU path uses"),
    (r"Apex is not installed", "as above"),
    (r"Only transformer-engine>=1\.7\.0 supports MoE experts",
     "the CPU transformer-engine import stub has no version; no MoE model is built on CPU"),
    (r"full scope is deprecated",
     "megatron-core 0.19 config default touched by Megatron-Bridge providers; no CUDA graphs"),
    (r"Per-rank checkpoint \S+ not found, falling back to",
     ("ModelOpt 0.47's Minitron searcher looks for its importance scores per rank first; the "
      "prune stage's score cache (`importance/`) is one file, or none yet on a first run")),
    (r"Checkpoint \S+ does not exist! Initializing from scratch",
     ("ModelOpt 0.47's Minitron searcher on a first run: no importance scores are cached yet, "
      "so it computes them (and saves them there for a resumed prune)")),
    (r"Teacher's Module `\w+` already has an intermediate output stored",
     ("ModelOpt 0.47: a teacher forward outside compute_kd_loss (validation KL); the stored "
     "output is overwritten by the next forward")),
)

# (logger name, message regex, why it is harmless)
_LOG_RECORDS = (
    ("megatron.bridge.utils.import_utils", r"^Import of \S+ from \S+ failed with",
     ("Megatron-Bridge 0.6 logs a full traceback at INFO (on its own handler, at a level it "
     "sets itself) for every optional transformer-engine symbol it probes")),
    ("ray._private.authentication.authentication_token_setup",
     r"^Token authentication is enabled for this Ray cluster",
     ("Ray 2.60 notes on every `ray.init` that it made a token for its ports; the data stage's "
     "session is local to the node and ends with the build")),
    ("megatron.core.models.gpt.gpt_model", r"^GPTModel IS DEPRECATED",
     ("megatron-core 0.19 warns on every GPTModel built; ModelOpt's Minitron and "
     "Megatron-Bridge 0.6.2 build GPTModel")),
)

# megatron.training (imported by Megatron-Bridge) sets the root logger to INFO at import, which
# turns on every library's INFO chatter; these loggers keep WARNING and above: lm-eval's
# per-model set-up lines (the eval stage prints its own table), Bridge's provider notes.
_INFO_CHATTER = ("lm_eval", "megatron.bridge")


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


def quiet_known_noise() -> None:
    """Install the filters (idempotent). Logger filters are attached to the named loggers
    themselves, so they hold even when a library later resets the logger's level or adds its
    own handler."""
    for pattern, _why in _WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in _INFO_CHATTER:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, pattern, _why in _LOG_RECORDS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMatching) and f.pattern.pattern == pattern
                   for f in logger.filters):
            logger.addFilter(_DropMatching(pattern))
    try:
        # heavy: transformers (seconds to import), only where an HF model or tokenizer loads
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        return
    # One "Loading weights" bar per checkpoint read (a run reads dozens); stages show their own.
    hf_logging.disable_progress_bar()

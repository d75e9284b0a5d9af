"""Named training recipes: TOML files of ModelConfig and TrainConfig fields (``[model]``, ``[train]``).

A recipe gives the values that differ from the dataclasses' defaults; command-line options override a recipe.
``monuseg`` is the shipped model's recipe and the default of ``textdiff train``.
"""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

FOLDER = Path(__file__).parent
DEFAULT = "monuseg"


def names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.toml"))


def load(name_or_path: str) -> dict[str, dict]:
    """``{"model": {...}, "train": {...}}`` of a shipped recipe name or a TOML file, fields checked."""
    from ..model import ModelConfig
    from ..train import TrainConfig

    path = Path(name_or_path)
    if not path.suffix:
        path = FOLDER / f"{name_or_path}.toml"
    if not path.is_file():
        raise ValueError(f"no recipe {name_or_path!r}: give one of {', '.join(names())} or a .toml file")
    with open(path, "rb") as handle:
        recipe = tomllib.load(handle)
    unknown_sections = set(recipe) - {"model", "train"}
    if unknown_sections:
        raise ValueError(f"{path}: unknown sections {sorted(unknown_sections)} (only [model] and [train])")
    for section, cls in (("model", ModelConfig), ("train", TrainConfig)):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(recipe.get(section, {})) - known
        if unknown:
            raise ValueError(f"{path}: unknown [{section}] keys {sorted(unknown)}")
    model = dict(recipe.get("model", {}))
    if isinstance(model.get("labels"), list):  # foreground names; background is 0
        model["labels"] = {"background": 0} | {name: i + 1 for i, name in enumerate(model["labels"])}
    return {"model": model, "train": dict(recipe.get("train", {}))}

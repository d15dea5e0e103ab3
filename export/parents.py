"""Where trained weights come from: the shipped fold models, run folders, cross-validation
folders and Keras files, as ``--init-from`` (fine-tuning) and ``--distill-from`` (a
teacher) name them."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from smearscan.preprocess import Recipe

log = logging.getLogger("export.parents")

#: Where the default model's Keras weights live, for ``--init-from default``.
DEFAULT_PARENT = Path(__file__).parent / "default_model"


def resolve_parent(spec: str) -> Path:
    """The training run, cross-validation folder or Keras file that ``--init-from`` names."""
    path = DEFAULT_PARENT if spec == "default" else Path(spec)
    if path.is_dir() and (path / "cv.json").is_file():
        return path  # the fold models, averaged as shipped
    if path.is_dir():
        path = path / "model.keras"
    if path.suffix != ".keras" or not path.is_file():
        raise ValueError(
            f"--init-from {spec}: need 'default', a training run or cross-validation folder, "
            f"or a .keras file ({path} not found)"
        )
    return path


def cv_folds(folder: Path) -> list[Path]:
    return sorted(folder.glob("fold_*"), key=lambda p: int(p.name.split("_")[1]))


def parent_config_of(parent: Path) -> dict:
    """The training config that describes a parent's weights (labels, recipe, architecture)."""
    if parent.is_dir():
        config = json.loads((cv_folds(parent)[0] / "config.json").read_text())
        return {**config, "name": parent.name}
    return json.loads((parent.parent / "config.json").read_text())


def load_parent(parent: Path):
    """The parent's weights as one Keras model: a CV folder's fold models are averaged in one
    graph, exactly as ``export.to_onnx`` ships them."""
    import keras

    if not parent.is_dir():
        return keras.models.load_model(parent, compile=False)
    from export.to_onnx import ensemble_model

    members = [keras.models.load_model(f / "model.keras", compile=False) for f in cv_folds(parent)]
    return ensemble_model(members, members[0].input_shape[1])


def load_teacher(spec: str, fold: int, val_patients: set[str], recipe: Recipe):
    """The teacher of a distillation, and what it is. ``spec`` names one teacher or several,
    comma-separated (for example two seeds' cross-validation folders), averaged in one graph.
    For a cross-validation folder and a validating fold k, only its fold-k model, after
    checking that this model never saw the donors this training validates on (the
    out-of-fold estimate stays honest); for ``--fold -1`` its fold models averaged, as
    shipped. Raises ValueError otherwise."""
    from export.to_onnx import ensemble_model

    members: list = []
    sources: list[str] = []
    for one in spec.split(","):
        models, source = _teacher_members(one.strip(), fold, val_patients, recipe)
        members.extend(models)
        sources.append(source)
    if len(members) == 1:
        return members[0], {"teacher": sources[0], "members": 1}
    teacher = ensemble_model(members, members[0].input_shape[1])
    return teacher, {"teacher": ",".join(sources), "members": len(members)}


def _teacher_members(spec: str, fold: int, val_patients: set[str], recipe: Recipe):
    """The Keras models one teacher spec contributes, and where they came from."""
    import keras

    path = resolve_parent(spec)
    config = parent_config_of(path)
    if Recipe.from_json(json.dumps(config["recipe"])) != recipe:
        raise ValueError(f"--distill-from {spec}: the teacher prepares crops another way")
    if not path.is_dir():
        if fold >= 0:
            log.warning(
                "--distill-from %s: a single model; nothing checks that it never saw this "
                "fold's validation donors",
                spec,
            )
        return [keras.models.load_model(path, compile=False)], str(path)
    if fold < 0:
        folds = cv_folds(path)
        return [keras.models.load_model(f / "model.keras", compile=False) for f in folds], str(path)
    member = path / f"fold_{fold}"
    seen = set(json.loads((member / "config.json").read_text())["split"]["train_patients"])
    if seen & val_patients:
        overlap = len(seen & val_patients)
        raise ValueError(
            f"--distill-from {spec}: its fold {fold} model saw {overlap} of this fold's "
            "validation donors"
        )
    return [keras.models.load_model(member / "model.keras", compile=False)], str(member)

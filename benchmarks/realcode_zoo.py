"""Real model code beyond timm/torchvision, built from configs and YAMLs with random weights (nothing downloaded).

Two libraries, each enumerated from the library itself rather than from a hand-written list:

- **transformers**: every model type whose modeling code mentions BatchNorm (``BatchNorm``,
  ``running_mean`` or ``batch_norm`` in ``transformers/models/<type>/modeling_*.py``), plus the
  types that host a configurable backbone (:data:`BACKBONE_HOSTS`). Each type is built once, as
  the first class found for it in :data:`TASK_ORDER` (the most complete head first, the base
  model last; vision/audio towers and, for a directory the auto-mappings do not name, its classes
  by suffix: :func:`transformers_types`), from its default config (``model_class.config_class()``)
  with every ``use_pretrained_backbone`` set to False,
  layer counts over :data:`MAX_LAYERS` cut to it and a few sizes shrunk (:func:`shrink_config`);
  a type whose built model has no BN-like module (``running_mean`` and ``running_var`` buffers)
  is dropped. The example inputs come from the config (:func:`transformers_inputs`).
- **ultralytics**: every YAML under ``ultralytics/cfg/models`` (but those with a ``TorchVision``
  backbone layer, which loads pretrained torchvision weights), at its smallest scale, built with
  ``YOLO(<name>.yaml)`` (``RTDETR(...)`` for RT-DETR), detection, segmentation, pose, OBB,
  classification, depth, semantic segmentation, YOLO-World and YOLOE heads included.

Each model is returned as a :class:`RealModel`: a module called with positional tensors only (a
transformers model is wrapped in :class:`KeywordCall`, which maps them to the keyword arguments
its forward takes and returns the output's tensors as a flat tuple), its example inputs, and the
library's own BatchNorm fuse where it has one.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_VERBOSE", "False")

__all__ = ["RealModel", "KeywordCall", "transformers_models", "ultralytics_models", "build", "randomize_bn",
           "flat_tensors", "BATCH"]

#: Every example input has this batch size (BatchNorm calibration needs more than one value per channel).
BATCH = 2
#: Layer counts (config attributes named like ``num_hidden_layers``) above this are cut to it.
MAX_LAYERS = 2
#: Models with more parameters than this (millions) are not swept (ultralytics YOLOv3 and the like).
MAX_PARAMS_M = 70.0


@dataclass
class RealModel:
    """One model to sweep: a module called as ``module(*inputs)``, and what else the sweep needs to know."""

    name: str
    library: str
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    #: The library's own BatchNorm fuse: folds the module it is given in place and returns the fused module.
    own_fuse: Callable[[nn.Module], nn.Module] | None = None
    notes: list[str] = field(default_factory=list)


def flat_tensors(obj: Any) -> tuple[torch.Tensor, ...]:
    """The tensors in a model output (tensor, tuple/list, dict, transformers ``ModelOutput``), in order."""
    if isinstance(obj, torch.Tensor):
        return (obj,)
    if isinstance(obj, dict):
        return tuple(t for v in obj.values() for t in flat_tensors(v))
    if isinstance(obj, (list, tuple)):
        return tuple(t for v in obj for t in flat_tensors(v))
    to_tuple = getattr(obj, "to_tuple", None)
    if callable(to_tuple):
        return flat_tensors(to_tuple())
    return ()


class KeywordCall(nn.Module):
    """Calls ``model(**dict(zip(names, args)), **fixed)`` and returns the output's tensors as a flat tuple.

    ``adapters.torch.fuse`` and ``verify`` take positional example inputs; transformers models take keyword
    arguments (``pixel_values=...``) and return ``ModelOutput`` records. This wrapper is the whole adaptation:
    the wrapped model is ``self.model``, so its module names gain a ``model.`` prefix.
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...], fixed: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        self.names = names
        self.fixed = dict(fixed or {})

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return flat_tensors(self.model(**dict(zip(self.names, args, strict=False)), **self.fixed))


# --------------------------------------------------------------------------------------------------
# BatchNorm statistics

def _bn_like(module: nn.Module) -> bool:
    buffers = module._buffers
    return isinstance(buffers.get("running_mean"), torch.Tensor) and isinstance(buffers.get("running_var"),
                                                                                torch.Tensor)


def _stats(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    mean, var = module._buffers["running_mean"], module._buffers["running_var"]
    assert mean is not None and var is not None  # _bn_like
    return mean, var


def randomize_bn(model: nn.Module, inputs: tuple[torch.Tensor, ...], generator: torch.Generator) -> str:
    """Give every BN-like module random affine parameters and non-trivial running statistics; returns how.

    Affine parameters: ``weight ~ U(0.5, 1.5)`` with a random sign on one channel in ten, ``bias ~ N(0, 0.25)``.
    Statistics: torch's ``_BatchNorm`` layers are calibrated on the example inputs (momentum 1 for one
    training-mode forward pass, the rest of the model in eval mode), so each layer's statistics match what it
    sees and deep networks do not blow up; every other BN-like module (FrozenBatchNorm copies), and every layer
    when calibration fails, gets ``running_mean ~ N(0, 0.5)``, ``running_var ~ U(0.5, 2)``. Variances are
    floored at 1 % of the layer's mean. The model is left in eval mode.
    """
    norms = [m for m in model.modules() if _bn_like(m)]
    with torch.no_grad():
        for m in norms:
            weight, bias = getattr(m, "weight", None), getattr(m, "bias", None)
            if isinstance(weight, torch.Tensor) and weight.is_floating_point():
                scale = torch.empty(weight.shape).uniform_(0.5, 1.5, generator=generator)
                flip = torch.rand(weight.shape, generator=generator) < 0.1
                weight.copy_(torch.where(flip, -scale, scale))
            if isinstance(bias, torch.Tensor) and bias.is_floating_point():
                bias.copy_(0.25 * torch.randn(bias.shape, generator=generator))
            mean, var = _stats(m)
            mean.copy_(0.5 * torch.randn(mean.shape, generator=generator))
            var.copy_(torch.empty(var.shape).uniform_(0.5, 2.0, generator=generator))
    batchnorms = [m for m in norms if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    how = "random statistics"
    if batchnorms:
        saved = [(m, m.momentum) for m in batchnorms]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        try:
            model.eval()
            for m in batchnorms:
                m.momentum = 1.0
                m.train()
            with torch.no_grad():
                model(*inputs)
            how = "calibrated on the example inputs"
        except Exception:  # a model that cannot run its norms in training mode keeps the random statistics
            model.load_state_dict(state)
        finally:
            for m, momentum in saved:
                m.momentum = momentum
            model.eval()
    with torch.no_grad():
        for m in norms:
            var = _stats(m)[1]
            average = float(var.double().mean())
            var.clamp_(min=0.01 * average if average > 0 else 1.0)
    return how


# --------------------------------------------------------------------------------------------------
# transformers

#: Model types that host a configurable backbone (their default one may have BatchNorm).
BACKBONE_HOSTS = ("upernet", "dpt", "vitmatte", "tvp", "depth_anything", "prompt_depth_anything", "rt_detr_resnet")

#: Which class is built for a model type: the first of these auto-mappings that has one.
TASK_ORDER = (
    "MODEL_FOR_OBJECT_DETECTION_MAPPING_NAMES", "MODEL_FOR_UNIVERSAL_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES", "MODEL_FOR_INSTANCE_SEGMENTATION_MAPPING_NAMES",
    "MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES", "MODEL_FOR_POSE_ESTIMATION_MAPPING_NAMES",
    "MODEL_FOR_KEYPOINT_MATCHING_MAPPING_NAMES", "MODEL_FOR_KEYPOINT_DETECTION_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_MATTING_MAPPING_NAMES", "MODEL_FOR_TEXT_RECOGNITION_MAPPING_NAMES",
    "MODEL_FOR_TABLE_RECOGNITION_MAPPING_NAMES", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_CTC_MAPPING_NAMES", "MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_TEXT_TO_SPECTROGRAM_MAPPING_NAMES", "MODEL_FOR_TIME_SERIES_CLASSIFICATION_MAPPING_NAMES",
    "MODEL_FOR_TIME_SERIES_PREDICTION_MAPPING_NAMES", "MODEL_FOR_BACKBONE_MAPPING_NAMES", "MODEL_MAPPING_NAMES",
)
_BN_MARKERS = re.compile(r"BatchNorm|running_mean|batch_norm")
_LAYER_COUNT = re.compile(r"^(num_hidden_layers|num_layers|encoder_layers|decoder_layers|num_encoder_layers|"
                          r"num_decoder_layers|.*_num_layers|num_.*_layers)$")


@functools.lru_cache(maxsize=1)
def transformers_types() -> dict[str, list[str]]:
    """``{model_type: candidate class names}`` for every type swept (see the module docstring), alphabetically.

    The candidates are the type's classes in :data:`TASK_ORDER`, then its vision and audio sub-models
    (``AlignVisionModel`` for ``AlignModel``: a multimodal model whose BatchNorm sits in one tower).
    """
    import transformers
    import transformers.models.auto.modeling_auto as auto

    models_dir = Path(transformers.__file__).parent / "models"
    types = set(BACKBONE_HOSTS)
    for path in models_dir.glob("*/modeling_*.py"):
        if _BN_MARKERS.search(path.read_text(encoding="utf-8", errors="replace")):
            types.add(path.parent.name)
    chosen: dict[str, list[str]] = {}
    for model_type in sorted(types):
        classes: list[str] = []
        for mapping in TASK_ORDER:
            names = getattr(auto, mapping, {}).get(model_type)
            for name in (names,) if isinstance(names, str) else tuple(names or ()):
                if name not in classes:
                    classes.append(name)
        base = getattr(auto, "MODEL_MAPPING_NAMES", {}).get(model_type)
        if isinstance(base, str) and base.endswith("Model"):
            classes += [base[: -len("Model")] + tower for tower in ("VisionModel", "AudioModel")
                        if hasattr(transformers, base[: -len("Model")] + tower)]
        if not classes:  # a directory whose model types are named otherwise (dab-detr, parakeet_ctc, ...)
            classes = _module_classes(model_type)
        if classes:
            chosen[model_type] = classes[:4]
    return chosen


#: For a model directory the auto-mappings do not name: its classes with these endings, in this order.
_CLASS_SUFFIXES = ("ForObjectDetection", "ForCTC", "ForTextToSpectrogram", "ForImageClassification", "Model",
                   "Encoder")


def _module_classes(directory: str) -> list[str]:
    import importlib

    import transformers

    try:
        module = importlib.import_module(f"transformers.models.{directory}")
    except Exception:  # a model package that does not import here (a missing optional dependency)
        return []
    names = [n for n in dir(module) if hasattr(transformers, n) and not n.endswith("PreTrainedModel")]
    return [n for suffix in _CLASS_SUFFIXES for n in sorted(names) if n.endswith(suffix)
            and "Text" not in n][:4]


def _set_everywhere(config: Any, fn: Callable[[Any], None], seen: set[int] | None = None) -> None:
    """Apply ``fn`` to a config and every sub-config it holds (backbone_config, text_config, ...)."""
    seen = set() if seen is None else seen
    if id(config) in seen:
        return
    seen.add(id(config))
    fn(config)
    for value in list(vars(config).values()):
        if hasattr(value, "to_dict") and hasattr(value, "model_type"):
            _set_everywhere(value, fn, seen)


def shrink_config(config: Any) -> list[str]:
    """Make a default config buildable offline and small; returns what was changed (one string each)."""
    changes: list[str] = []

    def one(cfg: Any) -> None:
        for key in ("use_pretrained_backbone",):
            if getattr(cfg, key, False):
                setattr(cfg, key, False)
                changes.append(f"{key}=False")
        for key, value in list(vars(cfg).items()):
            if isinstance(value, int) and not isinstance(value, bool) and value > MAX_LAYERS \
                    and _LAYER_COUNT.match(key):
                setattr(cfg, key, MAX_LAYERS)
                changes.append(f"{key}={MAX_LAYERS}")

    _set_everywhere(config, one)
    return changes


def _image_size(config: Any, default: int) -> tuple[int, int]:
    for cfg in (config, getattr(config, "vision_config", None), getattr(config, "backbone_config", None)):
        size = getattr(cfg, "image_size", None) if cfg is not None else None
        if isinstance(size, int) and size > 0:
            return size, size
        if isinstance(size, (list, tuple)) and len(size) == 2:
            return int(size[0]), int(size[1])
    return default, default


def _channels(config: Any) -> int:
    for cfg in (config, getattr(config, "backbone_config", None), getattr(config, "vision_config", None)):
        value = getattr(cfg, "num_channels", None) if cfg is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return 3


def _forward_parameters(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def transformers_inputs(model_type: str, model: nn.Module, config: Any, generator: torch.Generator, *,
                        small: bool = True) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...], dict[str, Any]]:
    """Keyword names, example tensors and fixed keyword arguments for one transformers model, from its config."""
    params = _forward_parameters(model)
    main = getattr(model, "main_input_name", params[0] if params else "pixel_values")
    fixed: dict[str, Any] = {}
    if "return_dict" in params:
        fixed["return_dict"] = True
    if "use_cache" in params:
        fixed["use_cache"] = False
    override = _INPUTS.get(model_type)
    if override is not None:
        names, tensors, extra = override(config, generator)
        fixed.update(extra)
        return names, tensors, fixed
    names, tensors = _main_input(model_type, main, params, config, generator, small)
    # arguments the forward requires besides the main input (grounding models need token ids)
    required = [n for n, p in inspect.signature(model.forward).parameters.items()
                if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and n not in names]
    for name in required:
        if name.endswith("input_ids"):
            vocab = int(getattr(config, "vocab_size", 100) or getattr(getattr(config, "text_config", None),
                                                                         "vocab_size", 100) or 100)
            tensors += (torch.randint(1, min(vocab, 100), (BATCH, 8), generator=generator),)
        elif name.endswith("_mask"):
            tensors += (torch.ones(BATCH, 8, dtype=torch.long),)
        else:
            raise ValueError(f"{model_type}: no example input for the required argument {name!r}")
        names += (name,)
    return names, tensors, fixed


def _main_input(model_type: str, main: str, params: list[str], config: Any, generator: torch.Generator,
                small: bool) -> tuple[tuple[str, ...], tuple[torch.Tensor, ...]]:
    if main == "pixel_values":
        h, w = (SMALL_IMAGE, SMALL_IMAGE) if small else _image_size(config, 224)
        return (main,), (torch.randn(BATCH, _channels(config), h, w, generator=generator),)
    if main == "input_values":
        return (main,), (torch.randn(BATCH, 4000, generator=generator),)
    if main == "input_features":
        bins = getattr(config, "num_mel_bins", None) or getattr(config, "feature_size", None) or 80
        return (main,), (torch.randn(BATCH, 64, int(bins), generator=generator),)
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 100) or 100)
        return (main,), (torch.randint(0, min(vocab, 100), (BATCH, 16), generator=generator),)
    if main == "past_values":
        length = int(getattr(config, "context_length", 32))
        channels = int(getattr(config, "num_input_channels", 1))
        return (main,), (torch.randn(BATCH, length, channels, generator=generator),)
    raise ValueError(f"{model_type}: no example inputs for main input {main!r} (forward takes {params[:6]})")


def _superglue_inputs(config: Any, generator: torch.Generator):
    return ("pixel_values",), (torch.rand(BATCH, 2, 3, 96, 96, generator=generator),), {}


def _speech_ids(config: Any, generator: torch.Generator):
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    return ("input_ids",), (torch.randint(1, min(vocab, 50), (BATCH, 12), generator=generator),), {}


_INPUTS: dict[str, Callable[[Any, torch.Generator], tuple[tuple[str, ...], tuple[torch.Tensor, ...],
                                                          dict[str, Any]]]] = {
    "superglue": _superglue_inputs,
    "efficientloftr": _superglue_inputs,
    "fastspeech2_conformer": _speech_ids,
}


#: Image side tried first for ``pixel_values`` (convolutional models accept it; the config's own size is the fallback).
SMALL_IMAGE = 128


def build_transformers(model_type: str, seed: int) -> RealModel:
    """One transformers model with random weights from its default config, wrapped for positional calls.

    Tried in turn until a forward pass on the example inputs succeeds and the model has a module with running
    statistics: each candidate class (:func:`transformers_types`) with the shrunk config (:func:`shrink_config`)
    and a :data:`SMALL_IMAGE` input, the shrunk config with the config's image size, then the same two with the
    default config (a few models tie their layer counts to other settings). The last error is raised.
    """
    import transformers

    error: Exception | None = None
    for class_name in transformers_types()[model_type]:
        model_class = getattr(transformers, class_name)
        no_bn = False
        for shrink in (True, False):
            for small in (True, False):
                if no_bn:
                    break
                try:
                    config = model_class.config_class()
                    changes = shrink_config(config) if shrink else []
                    if not shrink:
                        _set_everywhere(config, _no_pretrained)
                    params_m = _meta_params_m(model_class, config)
                    if params_m > MAX_PARAMS_M:
                        raise TooLarge(f"{class_name}: {params_m:.1f} M parameters > {MAX_PARAMS_M:g} M")
                    torch.manual_seed(seed)
                    model = model_class(config).eval()
                    if not any(_bn_like(m) for m in model.modules()):
                        error = ValueError(f"{class_name} has no module with running statistics")
                        no_bn = True  # another config of the same class will not have any either: the next class
                        break
                    names, tensors, fixed = transformers_inputs(model_type, model, config,
                                                                torch.Generator().manual_seed(seed + 1), small=small)
                    wrapped = KeywordCall(model, names, fixed).eval()
                    with torch.no_grad():
                        wrapped(*tensors)
                except Exception as exc:  # try the next configuration, then the next class
                    error = exc
                    continue
                changed = f" with {', '.join(sorted(set(changes)))}" if changes else ""
                shapes = ", ".join(f"{n}={tuple(t.shape)}" for n, t in zip(names, tensors, strict=True))
                note = f"{class_name} from {type(config).__name__}(){changed}; {shapes}"
                return RealModel(f"transformers/{model_type}", "transformers", wrapped, tensors, None, [note])
    assert error is not None
    raise error


class TooLarge(ValueError):
    """The model has more than :data:`MAX_PARAMS_M` million parameters (counted on the meta device, not built)."""


def _meta_params_m(model_class: Any, config: Any) -> float:
    """Millions of parameters of ``model_class(config)``, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = model_class(config)
    return sum(p.numel() for p in model.parameters()) / 1e6


def _no_pretrained(cfg: Any) -> None:
    if getattr(cfg, "use_pretrained_backbone", False):
        cfg.use_pretrained_backbone = False


def transformers_models() -> list[str]:
    return [f"transformers/{t}" for t in transformers_types()]


# --------------------------------------------------------------------------------------------------
# ultralytics

@functools.lru_cache(maxsize=1)
def ultralytics_yamls() -> dict[str, Path]:
    """``{model name: yaml}`` for every model YAML shipped with ultralytics, named at its smallest scale."""
    import ultralytics
    from ultralytics.nn.tasks import yaml_model_load

    found: dict[str, Path] = {}
    for path in sorted((Path(ultralytics.__file__).parent / "cfg" / "models").rglob("*.yaml")):
        if "TorchVision" in path.read_text(encoding="utf-8"):
            continue  # a TorchVision backbone layer loads torchvision's pretrained weights: nothing is downloaded here
        scales = yaml_model_load(path).get("scales") or {}
        stem = path.stem
        if len(scales) > 1:  # name the smallest scale the way ultralytics parses it: yolov8-seg -> yolov8n-seg
            stem = re.sub(r"^(.*?\d+)(.*)$", rf"\g<1>{next(iter(scales))}\g<2>", stem)
        found[stem] = path
    return found


def _ultralytics_fuse(model: nn.Module) -> nn.Module:
    """ultralytics' own ``BaseModel.fuse()``: folds Conv/ConvTranspose + BN and merges RepConv, in place."""
    fuse: Callable[..., nn.Module] = getattr(model, "fuse")  # noqa: B009 (ultralytics' BaseModel.fuse)
    return fuse(verbose=False)


def build_ultralytics(stem: str, seed: int) -> RealModel:
    """One ultralytics model from its YAML (random weights), in eval mode, with a 2x3x256x256 (224: cls) input."""
    from ultralytics import RTDETR, YOLO

    torch.manual_seed(seed)
    wrapper = RTDETR(f"{stem}.yaml") if "rtdetr" in stem else YOLO(f"{stem}.yaml", verbose=False)
    model = wrapper.model
    assert isinstance(model, nn.Module), f"{stem}: YOLO(...).model is {type(model).__name__}, not a module"
    model.eval()
    size = 224 if wrapper.task == "classify" else 256
    x = torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed + 1))
    return RealModel(f"ultralytics/{stem}", "ultralytics", model, (x,), _ultralytics_fuse,
                     [f"{type(model).__name__} ({wrapper.task}) from {ultralytics_yamls()[stem].name}"])


def ultralytics_models() -> list[str]:
    return [f"ultralytics/{stem}" for stem in ultralytics_yamls()]


def build(name: str, seed: int = 0) -> RealModel:
    """Build a model by its sweep name (``transformers/<type>`` or ``ultralytics/<yaml stem>``)."""
    library, arch = name.split("/", 1)
    if library == "transformers":
        return build_transformers(arch, seed)
    if library == "ultralytics":
        return build_ultralytics(arch, seed)
    raise ValueError(f"unknown library {library!r} in {name!r}")


def deepcopy_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)

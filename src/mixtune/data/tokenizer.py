"""Tokenizers: the Mixtral v1 SentencePiece model (offline default) or any Hub / local HF tokenizer.

    tok = load_tokenizer()                       # Mixtral v1 from mistral-common's package data
    tok = load_tokenizer("", model_dir="ckpt")   # the checkpoint's own tokenizer, else v1
    tok = load_tokenizer("mistral-common:v3")    # Mixtral-8x22B's v3 SentencePiece model ([INST] = control id 3)
    tok.encode("hello")                          # [6312, 28709]  (never adds specials unless asked)
    tok.save_pretrained("ckpt")                  # HF files stock AutoTokenizer loads to the same ids

Two backends behind one small API:
- SentencePiece directly (the v1 model, or a directory that only has `tokenizer.model`): exact, fast, and free
  of the transformers 5.x traps (3-token vocabularies, `legacy=False` changing the id after `<s>`).
- A transformers tokenizer (`AutoTokenizer`) for directories with HF tokenizer files and Hub ids.

Padding uses unk (id 0) when there is one, never eos: eos is a real label.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Optional

from ..config import ConfigError

V1_SPEC = "mistral-common:v1"
V3_SPEC = "mistral-common:v3"
# the SentencePiece models shipped in mistral-common's package data
_MC_FILES = {V1_SPEC: "tokenizer.model.v1", V3_SPEC: "mistral_instruct_tokenizer_240323.model.v3"}
_HF_FILES = ("tokenizer.json", "tokenizer_config.json")
# Set in tokenizer_config.json by `save_pretrained` of a SentencePiece tokenizer: the files are an exact HF
# rendering of tokenizer.model, so mixtune may load that directory through SentencePiece again (same ids,
# same cache identity, no transformers import) unless a chat template was added since.
SP_MARKER = "mixtune_sentencepiece_exact"


def v1_model_path() -> str:
    """Path of the Mixtral v1 SentencePiece model shipped inside the `mistral-common` package."""
    return mistral_common_model_path(V1_SPEC)


def mistral_common_model_path(spec: str) -> str:
    """Path of a SentencePiece model shipped inside the `mistral-common` package ('mistral-common:v1' / 'v3')."""
    import mistral_common

    name = _MC_FILES[spec]
    path = os.path.join(os.path.dirname(mistral_common.__file__), "data", name)
    if not os.path.isfile(path):
        raise ConfigError(f"mistral-common has no {name} at {path}; reinstall mistral-common")
    return path


class Tokenizer:
    """One tokenizer API over SentencePiece or a transformers tokenizer.

    Attributes: bos_id, eos_id, pad_id, unk_id, vocab_size, name (where it came from), chat_template (or None).
    """

    def __init__(self, *, sp=None, sp_path: Optional[str] = None, hf=None, name: str = ""):
        self._sp = sp
        self._sp_path = sp_path
        self._hf = hf
        self.name = name
        if sp is not None:
            self.bos_id, self.eos_id, self.unk_id = sp.bos_id(), sp.eos_id(), sp.unk_id()
            self.vocab_size = sp.vocab_size()
            self.chat_template = None
        else:
            self.bos_id = hf.bos_token_id
            self.eos_id = hf.eos_token_id
            self.unk_id = hf.unk_token_id
            self.vocab_size = len(hf)
            self.chat_template = getattr(hf, "chat_template", None) or None
        if self.eos_id is None:
            raise ConfigError(f"tokenizer {name}: it has no eos token; mixtune needs one to end examples")
        if self.unk_id is not None and self.unk_id >= 0:
            self.pad_id = self.unk_id
        elif sp is None and hf.pad_token_id is not None and hf.pad_token_id != self.eos_id:
            self.pad_id = hf.pad_token_id
        else:
            self.pad_id = 0
        self._identity: Optional[str] = None

    # ---------------------------------------------------------------- encode / decode
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids. SentencePiece semantics: the text gets the dummy-prefix space; special-token strings in
        `text` are NOT parsed as specials by the SentencePiece backend (bos/eos are ids, added only when asked)."""
        if self._sp is not None:
            ids = list(self._sp.encode(text))
        else:
            ids = list(self._hf.encode(text, add_special_tokens=False))
        if bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def encode_content(self, text: str) -> list[int]:
        """Data text (a response, an instruction, a chat turn) -> ids, special-token strings kept as plain
        text on both backends: a literal "</s>" in a response never becomes an eos id in the middle of an
        example (SentencePiece and mistral-common encode content this way; a transformers tokenizer parses
        them unless told not to)."""
        if self._sp is not None:
            return list(self._sp.encode(text))
        return list(self._hf.encode(text, add_special_tokens=False, split_special_tokens=True))

    def encode_with_specials(self, text: str) -> list[int]:
        """Text in which special-token strings (`<s>`, `</s>`, ...) are specials (chat templates render them)."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if self._sp is None:
            return self._hf.decode(ids, skip_special_tokens=skip_special)
        if skip_special:
            return self._sp.decode([i for i in ids if not self._sp.is_control(i)])
        out, run = [], []
        for i in ids:
            if self._sp.is_control(i):
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def special_id(self, piece: str) -> Optional[int]:
        """The id of a control / special token by its string ("[INST]", "<|im_end|>"), or None if it has none."""
        if self._sp is not None:
            i = self._sp.piece_to_id(piece)  # unk for a piece it does not have
            return int(i) if self._sp.id_to_piece(i) == piece and self._sp.is_control(i) else None
        vocab = self._hf.get_vocab()
        i = vocab.get(piece)
        return int(i) if i is not None else None

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i)) if self._sp is not None else self._hf.convert_ids_to_tokens(int(i))

    # ---------------------------------------------------------------- transformers view
    @property
    def hf(self):
        """The transformers tokenizer. For the SentencePiece backend it is built on first use from the same
        model file and gives the same ids as SentencePiece (see `_exact_hf_files`)."""
        if self._hf is None:
            from transformers import AutoTokenizer

            with tempfile.TemporaryDirectory() as tmp:
                _exact_hf_files(self._sp, self._sp_path, tmp)
                self._hf = AutoTokenizer.from_pretrained(tmp)
        return self._hf

    def save_pretrained(self, directory: str) -> list[str]:
        """Write HF tokenizer files that stock `AutoTokenizer.from_pretrained(directory)` loads to the same ids:
        tokenizer.json, tokenizer_config.json (with `legacy: true`) and, for SentencePiece, tokenizer.model.
        Returns the file names in the directory."""
        os.makedirs(directory, exist_ok=True)
        if self._sp is not None:
            _exact_hf_files(self._sp, self._sp_path, directory)
            return sorted(os.listdir(directory))
        hf = self.hf
        hf.save_pretrained(directory)
        legacy = getattr(hf, "legacy", None)
        # transformers does not persist `legacy`; without it stock Llama loaders encode the text after <s>
        # differently (28792 instead of 733 for the "[" of "<s>[INST]").
        _patch_config(os.path.join(directory, "tokenizer_config.json"),
                      {"legacy": bool(legacy) if legacy is not None else True})
        return sorted(os.listdir(directory))

    # ---------------------------------------------------------------- identity (cache keys)
    def identity(self) -> str:
        """A hash of everything that decides ids: the model file or the vocabulary, specials, chat template."""
        if self._identity is None:
            h = hashlib.sha256()
            if self._sp is not None:
                h.update(b"sp:")
                h.update(self._sp.serialized_model_proto())
            else:
                h.update(f"hf:{type(self._hf).__name__}:{getattr(self._hf, 'legacy', None)}".encode())
                h.update(json.dumps(sorted(self._hf.get_vocab().items())).encode())
                h.update(json.dumps([self.bos_id, self.eos_id, self.unk_id]).encode())
                backend = getattr(self._hf, "backend_tokenizer", None)
                if backend is not None:  # normalizer, pre-tokenizer, merges, added tokens: all decide ids
                    h.update(backend.to_str().encode())
            h.update((self.chat_template or "").encode())
            self._identity = h.hexdigest()[:16]
        return self._identity

    def __repr__(self) -> str:
        kind = "sentencepiece" if self._sp is not None else type(self._hf).__name__
        return f"Tokenizer({self.name!r}, {kind}, vocab={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


def _patch_config(path: str, updates: dict) -> None:
    with open(path) as fh:
        cfg = json.load(fh)
    for k in ("is_local", "local_files_only"):  # machine-specific loader state, not tokenizer facts
        cfg.pop(k, None)
    cfg.update(updates)
    with open(path, "w") as fh:
        json.dump(cfg, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


def _exact_hf_files(sp, sp_path: str, directory: str) -> None:
    """Write tokenizer.json / tokenizer_config.json / tokenizer.model for a SentencePiece BPE model such that
    a tokenizers-backed loader reproduces SentencePiece's ids exactly.

    transformers' converter (LlamaTokenizer from tokenizer.model) differs from SentencePiece on runs of spaces
    (code indentation, "a  b"): it ranks the whitespace-only merges ("▁▁", score -1e9 in the model) first, and
    its Metaspace pre-tokenizer adds no dummy prefix to text that already starts with a space. Here the merges
    are re-ranked by the SentencePiece score of the merged piece (how SentencePiece BPE picks merges) and the
    pipeline is SentencePiece's: normalizer Prepend("▁") + Replace(" ", "▁"), no pre-tokenizer. The class is
    `PreTrainedTokenizerFast` (loads tokenizer.json as is, in transformers 4.x and 5.x); `legacy: true` is kept
    for loaders that rebuild a Llama pipeline.
    """
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(sp_path, os.path.join(tmp, "tokenizer.model"))
        llama = LlamaTokenizer.from_pretrained(tmp, legacy=True, add_bos_token=True, add_eos_token=False)
        llama.save_pretrained(directory)
    tj_path = os.path.join(directory, "tokenizer.json")
    with open(tj_path, encoding="utf-8") as fh:
        tj = json.load(fh)
    merges = tj["model"]["merges"]
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in merges]
    order = sorted(range(len(pairs)), key=lambda i: (-sp.get_score(sp.piece_to_id(pairs[i][0] + pairs[i][1])), i))
    tj["model"]["merges"] = [merges[i] for i in order]
    tj["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    tj["pre_tokenizer"] = None
    with open(tj_path, "w", encoding="utf-8") as fh:
        json.dump(tj, fh, ensure_ascii=False)
    _patch_config(os.path.join(directory, "tokenizer_config.json"),
                  {"tokenizer_class": "PreTrainedTokenizerFast", "legacy": True, "add_bos_token": True,
                   "add_eos_token": False, SP_MARKER: True})
    shutil.copyfile(sp_path, os.path.join(directory, "tokenizer.model"))


def _sp_tokenizer(path: str, name: str) -> Tokenizer:
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_file=path)
    except Exception as e:  # sentencepiece raises bare RuntimeError/OSError for bad files
        raise ConfigError(f"tokenizer {name}: cannot read SentencePiece model {path} ({e})") from None
    return Tokenizer(sp=sp, sp_path=path, name=name)


def _hf_tokenizer(spec: str, revision: Optional[str] = None) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(spec, revision=revision)
    except Exception as e:  # noqa: BLE001 - Hub/network/format errors all mean "cannot load this tokenizer"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"tokenizer {spec!r}: cannot load it with transformers ({first})") from None
    tok = Tokenizer(hf=hf, name=spec)
    if tok.vocab_size < 100:
        raise ConfigError(f"tokenizer {spec!r}: loaded a {tok.vocab_size}-token vocabulary; the tokenizer "
                          f"files are incomplete (a SentencePiece model needs `protobuf` to convert)")
    return tok


def _from_dir(path: str) -> Optional[Tokenizer]:
    """A directory's own tokenizer: HF files first, else a bare tokenizer.model; None if it has neither."""
    sp_file = os.path.join(path, "tokenizer.model")
    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(sp_file) and os.path.isfile(cfg_file) and \
            not os.path.isfile(os.path.join(path, "chat_template.jinja")):
        try:
            with open(cfg_file) as fh:
                tc = json.load(fh)
        except (OSError, ValueError):
            tc = {}
        if tc.get(SP_MARKER) and not tc.get("chat_template"):
            return _sp_tokenizer(sp_file, path)
    if any(os.path.isfile(os.path.join(path, f)) for f in _HF_FILES):
        return _hf_tokenizer(path)
    if os.path.isfile(sp_file):
        return _sp_tokenizer(sp_file, path)
    return None


def load_tokenizer(spec: str = "", model_dir: Optional[str] = None) -> Tokenizer:
    """Load a tokenizer.

    spec: "" (the model directory's own tokenizer if it has one, else Mixtral v1 from mistral-common),
    "mistral-common:v1", "mistral-common:v3" (Mixtral-8x22B), a local directory (HF files or a bare tokenizer.model), a `.model` SentencePiece file,
    or a Hub id. model_dir: a local checkpoint directory, or a Hub id (its tokenizer is fetched when spec is "").
    """
    spec = (spec or "").strip()
    if spec in (V1_SPEC, "v1", "mixtral-v1"):
        return _sp_tokenizer(v1_model_path(), V1_SPEC)
    if spec in (V3_SPEC, "v3", "mixtral-v3"):
        return _sp_tokenizer(mistral_common_model_path(V3_SPEC), V3_SPEC)
    if spec:
        if os.path.isdir(spec):
            tok = _from_dir(spec)
            if tok is None:
                raise ConfigError(f"model.tokenizer: directory {spec} has no tokenizer files "
                                  f"(tokenizer.json, tokenizer_config.json or tokenizer.model)")
            return tok
        if os.path.isfile(spec):
            return _sp_tokenizer(spec, spec)
        if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
            raise ConfigError(f"model.tokenizer: {spec} does not exist")
        return _hf_tokenizer(spec)
    if model_dir:
        if os.path.isdir(model_dir):
            tok = _from_dir(model_dir)
            if tok is not None:
                return tok
        elif not model_dir.startswith((".", "/", "~")) and model_dir.count("/") == 1:
            return _hf_tokenizer(model_dir)
    return _sp_tokenizer(v1_model_path(), V1_SPEC)

"""Everything between a dataset and the batches the model sees, plus `mixtune prepare`.

    tok = load_tokenizer()                         # Mixtral v1 (mistral-common), bos 1, eos 2, pad = unk 0
    data = prepare_data(cfg, tok)                  # .train_rows .eval_rows .eval_examples .stats (cached)
    for batch in iterate_batches(data.train_rows, 4, shuffle=True, seed=42, epoch=0, start=0):
        batch["input_ids"], batch["labels"], batch["position_ids"]   # LongTensors (B, T)

Modules: tokenizer (load/save; mistral-common v1/v3, HF), sources (bundled, local files, Hub, streaming), schemas
(rows -> conversations: instruct, alpaca, OpenAI messages, ShareGPT, raw text), templates (prompt formats), chat
(the tokenizer's own chat template, apply_chat_template-exact), records (a source -> examples), mixture
(data.datasets mixed by weight), tokenize (ids + loss mask), packing (rows, batches), prepare (pipeline, cache,
`mixtune prepare`).
"""

from .packing import IGNORE, collate, iterate_batches, num_batches, pack_examples
from .prepare import PreparedData, format_stats, prepare_data, prepare_main
from .sources import BUNDLED, BadRow, DataError
from .templates import (BACKTRANSLATE_TASK, TEMPLATES, format_generation_prompt, recover_instruction,
                        wrap_instruction)
from .tokenize import encode_generation_prompt
from .tokenizer import Tokenizer, load_tokenizer, v1_model_path

__all__ = ["load_tokenizer", "Tokenizer", "v1_model_path", "prepare_data", "prepare_main", "PreparedData",
           "format_stats", "iterate_batches", "collate", "num_batches", "pack_examples", "IGNORE",
           "format_generation_prompt", "encode_generation_prompt", "recover_instruction", "wrap_instruction", "BACKTRANSLATE_TASK",
           "TEMPLATES", "BUNDLED", "DataError", "BadRow"]

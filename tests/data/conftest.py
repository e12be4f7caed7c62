"""Data-test fixtures: a small ChatML tokenizer with a Qwen3-style chat template, built offline.

`chatml_dir` is a directory with tokenizer.json + tokenizer_config.json + chat_template.jinja, as a Qwen3
checkpoint ships them: a byte-level BPE trained here on a few sentences, `<|endoftext|>` / `<|im_start|>` /
`<|im_end|>` as special tokens (eos `<|im_end|>`, pad `<|endoftext|>`, no bos), `<think>` / `</think>` as added
(non-special) tokens. The template is written here from Qwen3's documented chat format: ChatML turns; a
system turn first (or the tool list in one); assistant turns after the last real user query carry a
`<think>\\n...\\n</think>\\n\\n` block (the last one always, empty if it has no reasoning), earlier ones lose their
reasoning; reasoning comes from `reasoning_content` or from a `<think>...</think>` prefix of the content; tool
calls as `<tool_call>` JSON; tool results grouped into one user turn of `<tool_response>` blocks; the generation
prompt `<|im_start|>assistant\\n`, plus an empty think block when `enable_thinking` is false.
"""

import pytest

QWEN3_STYLE_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nReturn each call as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    # the last user turn that is a real query (not a wrapped tool response)
    "{%- set ns = namespace(last_query=messages|length - 1, searching=true) %}"
    "{%- for m in messages[::-1] %}"
    "{%- set idx = messages|length - 1 - loop.index0 %}"
    "{%- if ns.searching and m.role == 'user' and m.content is string and not (m.content.startswith('<tool_response>')"
    " and m.content.endswith('</tool_response>')) %}"
    "{%- set ns.searching = false %}{%- set ns.last_query = idx %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- set content = m.content if m.content is string else '' %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- set reasoning = '' %}"
    "{%- if m.reasoning_content is string %}{%- set reasoning = m.reasoning_content %}"
    "{%- elif '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content }}{%- endif %}"
    "{%- if m.tool_calls %}"
    "{%- for tc in m.tool_calls %}"
    "{%- if (loop.first and content) or not loop.first %}{{- '\\n' }}{%- endif %}"
    "{%- set f = tc.function if tc.function else tc %}"
    "{{- '<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' }}"
    "{%- if f.arguments is string %}{{- f.arguments }}{%- else %}{{- f.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}")

CORPUS = ["You are a helpful assistant. What is the capital of France? Paris is the capital of France.",
          "Let me think step by step about the question, then answer it briefly.",
          "def add(x, y):\n    return x + y\n", "The weather in Paris today is sunny with 21 degrees.",
          "Call the tool get_weather with the city name and read the result."]


def build_chatml_tokenizer(directory: str):
    """Write the ChatML tokenizer into `directory`; returns the transformers tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.add_tokens([AddedToken("<think>", special=False, normalized=False),
                    AddedToken("</think>", special=False, normalized=False)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    hf.chat_template = QWEN3_STYLE_TEMPLATE
    hf.save_pretrained(directory)
    return hf


@pytest.fixture(scope="session")
def chatml_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("chatml-tokenizer"))
    build_chatml_tokenizer(path)
    return path

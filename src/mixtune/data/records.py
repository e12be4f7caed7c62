"""One source's rows -> validated, formatted examples (in source order), with bad rows counted or refused.

    exs, schema = read_examples(src, template="chat-template", columns={}, data_cfg=cfg.data, tokenizer=tok,
                                counts=counts, bad_msgs=bad, limit=1000)

The schema is set by the first row that decodes (a later row of another schema is named, with that row's
number); rows are read one at a time, so a streamed Hub dataset with a limit stops reading at the limit.
"""

from __future__ import annotations

from .schemas import column_map, detect_schema, to_conversation
from .sources import BadRow, DataError
from .templates import render_example


def _bad(e: BadRow, data_cfg, counts: dict, bad_msgs: list) -> None:
    if not data_cfg.skip_bad_rows:
        raise DataError(f"{e} (set --data.skip_bad_rows true to skip and count bad rows)") from None
    counts[e.reason] = counts.get(e.reason, 0) + 1
    if len(bad_msgs) < 5:
        bad_msgs.append(str(e))


def read_examples(src, *, template: str, columns: dict, data_cfg, tokenizer, counts: dict, bad_msgs: list,
                  limit: int = 0) -> tuple[list, str]:
    """Valid rows of `src` as [Example] in source order (at most `limit` rows read; 0 = all), and the schema."""
    cmap = column_map(columns)
    kwargs = dict(getattr(data_cfg, "chat_template_kwargs", None) or {})
    declared = src.column_names()  # Hub datasets declare their columns; files: the first decodable row
    schema, first_row, out, n_read, pending = None, 0, [], 0, []
    for r in src.rows():
        n_read += 1
        if schema is None and (declared is not None or not isinstance(r.value, BadRow)):
            first_row = r.number
            cols = set(declared) if declared is not None else set(r.value.keys())
            schema = detect_schema(cols, cmap, src.name, first_row, template)
        if schema is None:
            pending.append(r)  # no schema yet: it is decided by the first row that decodes
        else:
            for row in pending + [r]:
                try:
                    if isinstance(row.value, BadRow):
                        raise row.value
                    conv = to_conversation(row.value, schema, cmap, row.where, row.number,
                                           first_row if declared is None else 0)
                    out.append(render_example(template, conv, data_cfg.train_on_prompt, tokenizer, kwargs,
                                              f"{row.where}: row {row.number}"))
                except BadRow as e:
                    _bad(e, data_cfg, counts, bad_msgs)
            pending = []
        if limit and n_read >= limit:
            break
    if n_read == 0:
        raise DataError(f"{src.name}: no rows")
    if schema is None:  # not one row decoded: its own error says why (not "no known columns")
        bad = [r.value for r in pending]
        if not data_cfg.skip_bad_rows:
            raise DataError(f"{bad[0]} (set --data.skip_bad_rows true to skip and count bad rows)")
        reasons: dict = {}
        for b in bad:
            reasons[b.reason] = reasons.get(b.reason, 0) + 1
        raise DataError(f"{src.name}: all {len(bad)} rows are bad {dict(sorted(reasons.items()))}; the "
                        f"first: {bad[0]}")
    return out, schema

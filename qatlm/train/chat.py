"""Chat rows -> the teacher's own chat template -> token ids, and which tokens an assistant turn produced.

A chat row of a .jsonl file is {"messages": [{"role": "user", "content": "..."}, ...]}. It is rendered with the
teacher's chat template (a GGUF teacher's tokenizer.chat_template, which transformers reads with the vocabulary;
a Hugging Face directory's chat_template.jinja / tokenizer_config.json), as the model sees a conversation in
use. With `kd_on="assistant"` (--kd-on assistant) only positions whose next token belongs to an assistant turn
are distilled; the assistant spans are found by rendering the conversation prefix by prefix:

    render(messages[:i], add_generation_prompt=True)  "...<start_of_turn>model\n"              (the prompt)
    render(messages[:i + 1])                           "...<start_of_turn>model\nHi!<end_of_turn>\n"

The characters the second adds ("Hi!<end_of_turn>") are assistant message i's span: its content and the
end-of-turn token the template closes it with (the model must learn to stop), minus the whitespace a template
writes after that special token (generation stops at the token; llama.cpp never samples the separator). The role
header is the generation prompt the application writes, so it is not trained on. Where a generation prompt opens
more than the rendered history shows (a reasoning model's "<think>\n"), the span starts where the two part. A
template without a special end-of-turn token (plain "assistant: ...\n" text) keeps its whole suffix, newline
included: that is its stop. Characters map to tokens by the tokenizer's offsets (a token overlapping a span
counts).

The rule needs a prefix-consistent template: render(messages[:i]) starts render(messages[:i + 1]), and each
assistant turn's rendering starts the whole conversation's. One that rewrites earlier turns once later turns
follow (Qwen 3 and gpt-oss drop the reasoning of earlier assistant turns; Phi-3.5 ends every rendering with EOS)
is refused, naming the file and line; one row per assistant turn avoids the rewriting. Of the 70 chat templates
llama.cpp ships (models/templates), 59 give the spans of a user/assistant/user/assistant conversation and 64 of
a single exchange; 4 of the others cannot render plain messages at all (tool-use templates). Hugging Face's
return_assistant_tokens_mask would need {% generation %} markers that few templates have.
"""
from __future__ import annotations

import os

ROLES = ("system", "developer", "user", "assistant", "tool")


def check_messages(msgs, where: str) -> list[dict]:
    """A row's 'messages', checked: a non-empty list of objects with a known string 'role' and a non-empty
    string 'content' (ValueError naming `where`, i.e. file:line, and the fix)."""
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                         f"objects, got {type(msgs).__name__ if msgs != [] else 'an empty list'}; fix that row")
    for j, m in enumerate(msgs):
        at = f"{where}: message {j}"
        if not isinstance(m, dict):
            raise ValueError(f"{at} is a {type(m).__name__}, not an object with 'role' and 'content'; fix that row")
        role = m.get("role")
        if not isinstance(role, str):
            raise ValueError(f"{at} has no string 'role' (one of {', '.join(ROLES)}); fix that row")
        if role not in ROLES:
            raise ValueError(f"{at}: unknown role {role!r}; use one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None:
            raise ValueError(f"{at}: 'content' is missing; it must be a string (text only); fix that row")
        if not text_value(content, at + ":", "'content'").strip():
            raise ValueError(f"{at} ({role}) has empty 'content'; drop the message or the row")
    return msgs


def text_value(value, where: str, what: str = "'text'") -> str:
    """A text field of a data row (a document's 'text', a message's 'content'): a str that UTF-8 can encode
    (json.loads lets lone surrogates such as "\\ud800" through). ValueError naming `where` otherwise."""
    if not isinstance(value, str):
        raise ValueError(f"{where} {what} is a {type(value).__name__}, not a string; fix that row")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where} {what} holds an invalid character ({e.reason}: a lone surrogate escape such as "
                         f"\\ud800 at position {e.start}); fix that row") from None
    return value


def render(tokenizer, msgs: list[dict], where: str, add_generation_prompt: bool = False) -> str:
    """The template's text for msgs (ValueError naming `where` when the template refuses them)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{where}: chat rows need the teacher's chat template, and its tokenizer has none (no "
                         "tokenizer.chat_template in the GGUF, no chat_template in the tokenizer files); use an "
                         "instruction-tuned teacher, or give the text as {\"text\": ...} rows")
    try:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2 errors, raise_exception() of the template (roles must alternate, ...)
        raise ValueError(f"{where}: the teacher's chat template cannot render these messages ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]}); fix that row") from None
    if not isinstance(text, str):
        raise ValueError(f"{where}: the chat template rendered a {type(text).__name__}, not text")
    return text


def _end_of_turn_tokens(tokenizer) -> tuple[str, ...]:
    return tuple(t for t in tokenizer.get_added_vocab() if t.strip())


def assistant_spans(tokenizer, msgs: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end) character span of each assistant turn]) (module docstring)."""
    full = render(tokenizer, msgs, where)
    specials = _end_of_turn_tokens(tokenizer)
    spans = []
    fix = ("the template renders earlier turns differently once later turns follow, so the assistant's tokens "
           "cannot be located; use --kd-on all, or give one row per assistant turn")
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, msgs[:i], where) if i else ""
        head = render(tokenizer, msgs[:i], where, add_generation_prompt=True)
        turn = render(tokenizer, msgs[:i + 1], where)
        if not turn.startswith(before):
            raise ValueError(f"{where}: message {i} (assistant): the messages before it render differently once it "
                             f"follows; {fix}")
        if not full.startswith(turn):
            raise ValueError(f"{where}: message {i} (assistant): the whole conversation does not start with its "
                             f"rendering up to this message; {fix}")
        # the reply starts where the rendered turn leaves the generation prompt: all of it in most templates; a
        # prompt that opens more than the history shows (a reasoning model's "<think>\n") ends the shared part early
        start, end = max(len(before), len(os.path.commonprefix([head, turn]))), len(turn)
        kept = turn[start:end].rstrip()
        if kept != turn[start:end] and kept.endswith(specials):  # whitespace after the end-of-turn token
            end = start + len(kept)
        if kept:
            spans.append((start, end))
    return full, spans


def chat_tokens(tokenizer, msgs: list[dict], where: str, assistant_only: bool) -> tuple[list[int], list[bool] | None]:
    """(token ids of the rendered conversation, per token: in an assistant turn (None unless assistant_only)).

    A BOS the template writes itself is dropped: the caller puts BOS first in every document, as for text."""
    msgs = check_messages(msgs, where)
    if not assistant_only:
        text, spans = render(tokenizer, msgs, where), []
    else:
        text, spans = assistant_spans(tokenizer, msgs, where)
    if assistant_only and not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{where}: --kd-on assistant maps characters to tokens with a fast (tokenizers) tokenizer; "
                         "this teacher's is a slow one. Use --kd-on all, or a teacher with tokenizer.json")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=assistant_only)
    ids = list(enc["input_ids"])
    # a token counts when its characters overlap an assistant span (a BPE merge across a span's edge counts)
    mask = [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]] if assistant_only else None
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids, mask = ids[1:], (mask[1:] if mask is not None else None)
    return ids, mask

"""Chat formats: a checkpoint's Jinja chat template, or the plain format.

Fine-tuning (:mod:`apollo_lm.sft`) renders conversations to find the tokens
the loss counts; generation (:mod:`apollo_lm.generate`) renders a prompt
that ends in the assistant's turn. Both reach the formats here, through
:class:`apollo_lm.tokenizer.CheckpointTokenizer`, without importing each
other.

Example::

  >>> from apollo_lm import chat_template
  >>> chat_template.render(
  ...     "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}",
  ...     [{"role": "user", "content": "hi"}])
  '<user>hi'
"""

from __future__ import annotations

from collections.abc import Sequence
import json
from typing import Any

CHAT_ROLES = ("system", "user", "assistant")
"""Roles accepted in ``messages`` (and by ``PLAIN_CHAT_FORMAT``)."""

PLAIN_CHAT_FORMAT = {
    "system": "System: {content}\n\n",
    "user": "User: {content}\n\n",
    "assistant": "Assistant: {content}",
}
"""The chat format for checkpoints without a chat template.

A conversation is ``[bos]`` followed by each message in this format; an
assistant message is followed by the EOS token. The loss counts an assistant
message's content and its EOS (not the ``"Assistant: "`` header). For
generation the prompt ends with ``"Assistant: "``.
"""



def compile_template(source: str) -> Any:
  """A template compiled as ``transformers`` does (sandboxed, trimmed blocks)."""
  try:
    import jinja2  # Optional dependency (extra `lm`), only for templates.
    from jinja2 import sandbox
  except ImportError as e:
    raise ImportError(
        "rendering a chat template needs jinja2: pip install \"apollo-optax"
        "[lm]\" (or jinja2)") from e

  def raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)

  def strftime_now(fmt: str) -> str:
    import datetime
    return datetime.datetime.now().strftime(fmt)

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(
      x, ensure_ascii=False, indent=indent)
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env.from_string(source)


def render(template: str, messages: Sequence[dict[str, Any]], *,
           add_generation_prompt: bool = False, bos_token: str = "",
           eos_token: str = "") -> str:
  """``template`` applied to ``messages``, as ``apply_chat_template`` does.

  Args:
    template: the Jinja source (``chat_template`` of ``tokenizer_config.json``).
    messages: ``{"role", "content"}`` dicts.
    add_generation_prompt: end with the header of the assistant's turn.
    bos_token: the text of the BOS token ("" if none).
    eos_token: the text of the EOS token.
  """
  return compile_template(template).render(
      messages=list(messages), add_generation_prompt=add_generation_prompt,
      bos_token=bos_token, eos_token=eos_token)

"""Multi-turn conversations that keep their recurrent state between messages.

Each conversation is just a recurrent state (the model's state pytree, batch 1): a new message is prefilled on top of it
and the reply is decoded from there, so a turn costs only its own tokens however long the
conversation is. States live in a bounded LRU cache; a conversation evicted from it
starts again from an empty state (``save``/``load`` keep one across evictions or runs).
"""

from __future__ import annotations

import collections
from typing import Hashable, Iterator, Sequence

import jax

from rwkv_jax.inference.generation import TokenStream, as_key, generate
from rwkv_jax.inference.sampling import SamplingConfig
from rwkv_jax.inference.state_io import load_state, save_state
from rwkv_jax.state import check_state


class ChatSession:
  """Keeps per-conversation states for one model.

  Args:
    model: a model of any family (``rwkv_jax.models``).
    tokenizer: optional; needed to send text (``encode``) rather than token ids.
    sampling: ``SamplingConfig`` for every reply (default: temperature 1).
    key: PRNG key or int seed; turn n of the session draws with ``fold_in(key, n)``.
    max_conversations: states kept; the least recently used one is dropped beyond this.
    stop_tokens: ids that end a reply (default: the tokenizer's ``eot_id`` if any).
    chunk_size: decode steps per device call when streaming.
    initial_state: the state every new (or reset, or evicted) conversation starts from
      (batch 1; e.g. a tuned state from ``rwkv-jax train --tune state``, read with
      ``rwkv_jax.tuning.load_tuned_state``); None: the empty state.
  """

  def __init__(self, model, tokenizer=None, *, sampling: SamplingConfig | None = None,
               key=None, max_conversations: int = 16,
               stop_tokens: Sequence[int] | None = None, chunk_size: int = 16,
               implementation: str | None = None, decode_step: str | None = None,
               initial_state=None):
    if isinstance(max_conversations, bool) or not isinstance(max_conversations, int) \
        or max_conversations < 1:
      raise ValueError(f"max_conversations must be a positive integer, got {max_conversations!r}")
    self.model = model
    self.tokenizer = tokenizer
    self.sampling = sampling or SamplingConfig()
    self.max_conversations = max_conversations
    if stop_tokens is None:
      eot = getattr(tokenizer, "eot_id", None)
      stop_tokens = () if eot is None else (eot,)
    self.stop_tokens = tuple(stop_tokens)
    self.chunk_size = chunk_size
    self.implementation = implementation
    self.decode_step = decode_step
    self.initial_state = None if initial_state is None else check_state(model, initial_state, 1)
    self._key = as_key(key)
    self._turn = 0
    self._states: collections.OrderedDict[Hashable, object] = collections.OrderedDict()

  # Cache.
  @property
  def conversations(self) -> list:
    """Conversation ids, least recently used first."""
    return list(self._states)

  def __len__(self) -> int:
    return len(self._states)

  def __contains__(self, conversation) -> bool:
    return conversation in self._states

  def state(self, conversation="default"):
    return self._states.get(conversation)

  def reset(self, conversation="default") -> None:
    self._states.pop(conversation, None)

  def set_state(self, conversation, state) -> None:
    """Sets a conversation's state (batch 1); ValueError if it does not fit the model."""
    self._states[conversation] = check_state(self.model, state, 1)
    self._states.move_to_end(conversation)
    while len(self._states) > self.max_conversations:
      self._states.popitem(last=False)

  def save(self, conversation, path) -> None:
    if conversation not in self._states:
      raise KeyError(f"no conversation {conversation!r} in this session")
    save_state(path, self._states[conversation], self.model,
               metadata={"conversation": str(conversation)})

  def load(self, conversation, path) -> None:
    self.set_state(conversation, load_state(path, self.model))

  # Turns.
  def _encode(self, message) -> list[int]:
    if isinstance(message, str):
      if self.tokenizer is None:
        raise ValueError("this ChatSession has no tokenizer: send token ids, not text")
      message = self.tokenizer.encode(message)
    ids = [int(t) for t in message]
    if not ids:
      raise ValueError("a message must hold at least one token")
    return ids

  def _next_key(self):
    key = jax.random.fold_in(self._key, self._turn)
    self._turn += 1
    return key

  def send(self, message, conversation="default", *, max_new_tokens: int = 128) -> list[int]:
    """Feeds ``message`` (text or ids) and returns the reply's token ids (a stop token
    included). The conversation's state then covers the message and the whole reply."""
    out = generate(self.model, [self._encode(message)], max_new_tokens=max_new_tokens,
                   sampling=self.sampling, key=self._next_key(),
                   state=self._states.get(conversation, self.initial_state),
                   stop_tokens=self.stop_tokens,
                   implementation=self.implementation, decode_step=self.decode_step)
    self.set_state(conversation, out.state)
    return [int(t) for t in out.tokens[0, :out.lengths[0]]]

  def stream(self, message, conversation="default", *,
             max_new_tokens: int = 128) -> Iterator[int]:
    """Like ``send`` but yields reply tokens as they are decoded. The conversation's state
    is updated when the reply ends; an abandoned stream leaves the conversation as it was."""
    tokens = TokenStream(self.model, [self._encode(message)], max_new_tokens=max_new_tokens,
                         sampling=self.sampling, key=self._next_key(),
                         state=self._states.get(conversation, self.initial_state),
                         stop_tokens=self.stop_tokens, chunk_size=self.chunk_size, implementation=self.implementation,
                         decode_step=self.decode_step)
    for tok in tokens:
      yield int(tok[0])
    self.set_state(conversation, tokens.state)

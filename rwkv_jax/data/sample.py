"""A small public-domain text shipped with the package, for examples and notebooks that
must run offline (e.g. in Colab without a checkout of the repository).

``corpus/tinyshakespeare_head.txt`` is the first 199,994 bytes (7,552 lines, ending at a
blank line between speeches) of tinyshakespeare, the Shakespeare compilation of Karpathy's
char-rnn (``data/tinyshakespeare/input.txt``): Shakespeare's plays are in the public
domain. ASCII only, no repeated passages, so the last part of it (the validation split of
``rwkv-jax train``) is text the model has not trained on.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLE_TEXT_NAME = "tinyshakespeare_head.txt"
SAMPLE_TEXT_SOURCE = ("the first 200 KB of tinyshakespeare (Shakespeare, public domain; "
                      "from Karpathy's char-rnn), shipped with rwkv-jax")


def sample_text_path() -> Path:
  """The path of the packaged sample text (installed with the package; read-only use)."""
  path = Path(str(resources.files("rwkv_jax.data") / "corpus" / SAMPLE_TEXT_NAME))
  if not path.is_file():
    raise FileNotFoundError(f"the packaged sample text is missing: {path} (a broken "
                            "install? reinstall rwkv-jax)")
  return path

"""Size limits of a tokenizer layout, checked before anything is allocated.

A file that names a [2^20, 2^20] layer or a chunk size of 2^40 is refused, not attempted.
The limits are generous for real models; raise them if you mean it, here or through the
package (``d2nwg.tokenizer.MAX_NUM_TOKENS = ...`` sets the value in this module, which is
where every check reads it, at call time).
"""

MAX_CHUNK_SIZE = 2**20  # values per token
MAX_NUM_TOKENS = 2**24  # tokens per model (positions/kinds cost 24 bytes each)
MAX_NUM_PARAMS = 2**36  # weights per model, tied tensors counted once
MAX_LAYERS = 2**20  # tensors in a layout (names and aliases)
MAX_RANK = 64  # dimensions of one tensor

NAMES = ("MAX_CHUNK_SIZE", "MAX_NUM_TOKENS", "MAX_NUM_PARAMS", "MAX_LAYERS", "MAX_RANK")

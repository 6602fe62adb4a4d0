"""Generation: a model's continuation of a prompt, as ids or as text.

    sampling.py  the next token: greedy, temperature, top-k, top-p; the settings' checks
    decode.py    stream / generate (one prompt, a sliding window past the context), generate_batch
                 (prompts of different lengths together), generate_group (n samples of one prompt),
                 stream_answer / answer (text until <|endoftext|> or a stop string)

Every decoding step is a call of the model's one forward with a KV cache (gpt2lab.model).
"""

from gpt2lab.generate.decode import (
    answer,
    fit_to_context,
    generate,
    generate_batch,
    generate_group,
    stream,
    stream_answer,
)
from gpt2lab.generate.sampling import check_settings, device_of, make_generator, sample_next

__all__ = ["answer", "check_settings", "device_of", "fit_to_context", "generate", "generate_batch", "generate_group",
           "make_generator", "sample_next", "stream", "stream_answer"]

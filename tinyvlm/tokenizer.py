"""A small byte-level BPE tokenizer carrying Qwen2-VL's special tokens.

Trained deterministically on a fixed corpus, so the same ids come out on every
machine. `<image>` is the literal placeholder SMG's Qwen-VL spec looks for.
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<image>", "<video>",
]

# Qwen2-VL's own template, with `image`/`image_url` parts rendered as `<image>`
# between the vision markers (SMG expands `<image>` into the image's pad run).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] in ('image', 'image_url') or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><image><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><video><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "grey"]
_SHAPES = ["circle", "square", "triangle", "star", "cross"]


def training_corpus(extra: tuple[str, ...] = ()) -> list[str]:
    """Sentences the BPE merges are learned from; "Describe" becomes one token.

    `extra` lines are appended (the trained checkpoint adds its answer words so each is
    one token); the default corpus, and so the random checkpoint, is unchanged without them.
    """
    lines = [
        "Describe the image.", "Describe this picture in detail.", "What is in the image?",
        "What colour is the shape?", "What shape is it?", "How many shapes are there?",
        "You are a helpful assistant.", "The quick brown fox jumps over the lazy dog.",
        "system user assistant", "Hello, world! 0123456789",
    ]
    for colour in _COLOURS:
        for shape in _SHAPES:
            lines.append(f"A {colour} {shape} on a plain background.")
            lines.append(f"Describe the {colour} {shape}. It is {colour}.")
    return (lines + list(extra)) * 4


def build_tokenizer(vocab_size: int, extra_corpus: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Train the BPE (on `training_corpus(extra_corpus)`) and wrap it as a transformers fast tokenizer."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_corpus(extra_corpus), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=SPECIAL_TOKENS,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast

"""A tiny BERT encoder and WordPiece tokenizer built locally (no download),
for the model, patching and training-command tests."""

import inspect
import os
import string

import torch

WORDS = """the a an and or but not is was are were be been it this that film movie story
plot acting great excellent brilliant wonderful terrible awful boring dull worst good bad
i my we our think believe guess maybe perhaps love hate happy sad moreover furthermore
therefore consequently results show data in conclusion summary first then next step by
according to article passage reports states answer question because so very really""".split()


def write_tokenizer(directory: str):
    """A BertTokenizerFast over a small vocabulary (words, single characters
    and their ``##`` continuations), saved to ``directory``."""
    from transformers import BertTokenizerFast

    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + chars + [f"##{c}" for c in chars]
    vocab += [w for w in dict.fromkeys(WORDS) if w not in vocab]
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(vocab) + "\n")
    # transformers 5 takes the vocabulary itself, 4 takes its file
    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:
        tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    else:
        tokenizer = BertTokenizerFast(vocab_file=path)
    tokenizer.save_pretrained(directory)
    return tokenizer


def tiny_bert(vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer, 64-wide BertModel with random weights."""
    from transformers import BertConfig, BertModel

    options = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=256,
    )
    options.update(overrides)
    torch.manual_seed(seed)
    return BertModel(BertConfig(**options))


def write_tiny_encoder(directory: str, seed: int = 0):
    """Tokenizer and encoder saved to ``directory``, loadable with
    ``AutoModel`` / ``AutoTokenizer.from_pretrained(directory)``."""
    tokenizer = write_tokenizer(directory)
    tiny_bert(len(tokenizer), seed).save_pretrained(directory)
    return directory


TASKS = {
    "sentiment": ["negative", "positive"],
    "authorship": ["human", "llm"],
    "reasoning": ["direct", "retrieval", "chain"],
}
_CUES = {
    ("sentiment", 0): "terrible awful boring dull worst bad".split(),
    ("sentiment", 1): "great excellent brilliant wonderful good love".split(),
    ("authorship", 0): "i my we think believe guess maybe perhaps".split(),
    ("authorship", 1): "moreover furthermore therefore consequently results data".split(),
    ("reasoning", 0): "answer is it".split(),
    ("reasoning", 1): "according to article passage reports states".split(),
    ("reasoning", 2): "first then next step by because so".split(),
}
_FILLER = "the a an and or but not is was are film movie story plot acting very really".split()


def synthetic_examples(n: int, seed: int = 0):
    """``n`` (text, task, label) examples over :data:`TASKS`: cue words of the
    class mixed with filler, class priors uneven, some digits and marks."""
    g = torch.Generator().manual_seed(seed)
    names = list(TASKS)
    texts, tasks, labels = [], [], []
    for _ in range(n):
        task = names[int(torch.randint(len(names), (1,), generator=g))]
        classes = len(TASKS[task])
        # uneven priors: class 0 twice as likely as each other class
        weights = torch.tensor([2.0] + [1.0] * (classes - 1))
        label = int(torch.multinomial(weights, 1, generator=g))
        cues, words = _CUES[(task, label)], []
        for _ in range(int(torch.randint(4, 14, (1,), generator=g))):
            pool = cues if torch.rand((), generator=g) < 0.4 else _FILLER
            words.append(pool[int(torch.randint(len(pool), (1,), generator=g))])
        if torch.rand((), generator=g) < 0.3:
            words.append(str(int(torch.randint(100, (1,), generator=g))))
        text = " ".join(words) + (" ?" if torch.rand((), generator=g) < 0.3 else " .")
        texts.append(text)
        tasks.append(task)
        labels.append(label)
    return texts, tasks, labels

"""A synthetic labelled corpus with known answers, for the vocabulary tests and
benchmark: background words drawn from one Zipf distribution shared by every
class, plus words planted in each class's documents at known rates."""

import numpy as np


def planted_corpus(
    num_docs,
    num_classes=3,
    planted_per_class=4,
    vocabulary=2000,
    words_per_doc=(5, 20),
    rates=(0.1, 0.15, 0.2, 0.3),
    zipf_s=1.1,
    seed=0,
):
    """Returns (texts, labels, planted): ``planted[c]`` are class c's words;
    each occurs in a class-c document with its rate (``rates``, cycled), at a
    random position among the background words, and never elsewhere."""
    rng = np.random.default_rng(seed)
    background = np.array([f"w{i}" for i in range(vocabulary)])
    p = 1.0 / np.arange(1, vocabulary + 1) ** zipf_s
    p /= p.sum()
    planted = [[f"c{c}planted{j}" for j in range(planted_per_class)] for c in range(num_classes)]
    rate = np.resize(np.asarray(rates, float), planted_per_class)
    labels = rng.integers(0, num_classes, num_docs)
    lengths = rng.integers(words_per_doc[0], words_per_doc[1] + 1, num_docs)
    words = background[rng.choice(vocabulary, lengths.sum(), p=p)]
    present = rng.random((num_docs, planted_per_class)) < rate
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    texts = []
    for i in range(num_docs):
        doc = list(words[bounds[i] : bounds[i + 1]])
        for j in np.nonzero(present[i])[0]:
            doc.insert(int(rng.integers(0, len(doc) + 1)), planted[labels[i]][j])
        texts.append(" ".join(doc) + ".")
    return texts, labels.tolist(), planted

"""A tiny BERT built from a config (no download) and tokenised examples, for
the tests of text inputs and of the integrations. Import it after
``pytest.importorskip("transformers")``."""

import torch
import transformers


def tiny_bert(num_labels, seed=0, vocab=50, **config):
    """BertForSequenceClassification with 2 layers, hidden size 16, 2 heads,
    no dropout (``config`` overrides any of these)."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=16, num_labels=num_labels,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(transformers.BertConfig(**{**settings, **config}))


def token_rows(n, seed, num_labels, length=6, vocab=50):
    """Examples as a tokenizer and a padding collator leave them: ids padded
    with 0 after a random length, the attention mask, a label that depends on
    the first token (so it can be learned)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        keep = int(torch.randint(2, length + 1, (1,), generator=g))
        ids = torch.zeros(length, dtype=torch.long)
        ids[:keep] = torch.randint(1, vocab, (keep,), generator=g)
        out.append({"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": int(ids[0]) % num_labels})
    return out

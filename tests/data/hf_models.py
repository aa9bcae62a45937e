"""Tiny Hugging Face models and token data, built in the tests (nothing downloaded): a
GPT-2 language model on padded sequences and a BERT-style sequence classifier, used by
hessdiag as they are (their forward returns a ``ModelOutput``)."""

import torch
from torch.utils.data import Dataset

VOCAB = 40


class Sentences(Dataset):
    """Sequences of 3 to 8 token ids; inputs a dict (input_ids, attention_mask) padded with
    id 0, targets the next ids with padding -100."""

    def __init__(self, n=10, lm=True):
        g = torch.Generator().manual_seed(0)
        self.items = [torch.randint(1, VOCAB, (int(torch.randint(3, 9, (1,), generator=g)),),
                                    generator=g) for _ in range(n)]
        self.labels = [int(t.sum()) % 3 for t in self.items]
        self.lm = lm
        self.meta = {"vocab_size": VOCAB, **({} if lm else {"num_classes": 3})}

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i], self.labels[i]

    def collate_fn(self, samples):
        longest = max(len(t) for t, _ in samples) - (1 if self.lm else 0)
        ids = torch.zeros(len(samples), longest, dtype=torch.long)
        mask = torch.zeros(len(samples), longest, dtype=torch.long)
        targets = torch.full((len(samples), longest), -100)
        for i, (t, _) in enumerate(samples):
            body = t[:-1] if self.lm else t
            ids[i, :len(body)] = body
            mask[i, :len(body)] = 1
            if self.lm:
                targets[i, :len(body)] = t[1:]
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.lm:
            return inputs, targets
        return inputs, torch.tensor([y for _, y in samples])


def lm_data(split="train"):
    return Sentences(10, lm=True)


def classes_data(split="train"):
    return Sentences(12, lm=False)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1,
                                      n_head=2, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=1, eos_token_id=1))


def bert():
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

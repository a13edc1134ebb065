import torch

from chameleon_ft.data.collator import ConversationCollator, PackedRows, pack_by_length, per_sample_loss
from chameleon_ft.model.modeling import ChameleonFTForCausalLM
from tests.model.helpers import randomize_, small_config


def make_samples(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = ids.clone()
        labels[: n // 3] = -100  # a prompt
        out.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return out


def test_pack_by_length_first_fit_decreasing():
    # 9 | 7 | 5 open three bins; 4 joins the 5, 3 the 7, 1 the 9 (worked by hand)
    assert pack_by_length([5, 9, 3, 7, 1, 4], 10) == [[1, 4], [3, 2], [0, 5]]
    try:
        pack_by_length([11], 10)
    except ValueError as e:
        assert "11 tokens" in str(e)
    else:
        raise AssertionError("an over-long sample must be refused")


def test_packed_logits_and_per_sample_loss_equal_unpacked():
    cfg = small_config(mask_image_logits=False)
    model = randomize_(ChameleonFTForCausalLM(cfg)).eval()
    samples = make_samples([7, 12, 5, 9, 3], cfg.vocab_size)
    collate = ConversationCollator(pad_id=cfg.pad_token_id, max_length=32)
    bins = pack_by_length([len(s["input_ids"]) for s in samples], 20)
    packed_rows = PackedRows(samples, bins)
    packed = collate([packed_rows[k] for k in range(len(packed_rows))])
    assert packed["attention_mask"].dim() == 4
    with torch.no_grad():
        out = model(packed["input_ids"], attention_mask=packed["attention_mask"],
                    position_ids=packed["position_ids"], labels=packed["labels"], return_logits=True)
        got = per_sample_loss(out.loss_sums.token_ce, out.loss_sums.token_index, packed["sample_index"])
        order = [i for b in bins for i in b]
        for k, i in enumerate(order):
            single = collate([samples[i]])
            ref = model(single["input_ids"], attention_mask=single["attention_mask"], labels=single["labels"],
                        return_logits=True)
            torch.testing.assert_close(got[k], ref.loss, rtol=1e-5, atol=1e-5)
            # logits of the sample inside the packed row equal its unpacked logits
            r, pos = divmod(int((packed["sample_index"].reshape(-1) == k).nonzero()[0]), packed["input_ids"].shape[1])
            n = len(samples[i]["input_ids"])
            torch.testing.assert_close(out.logits[r, pos : pos + n], ref.logits[0, :n], rtol=1e-4, atol=1e-5)


def test_padding_and_masks():
    samples = make_samples([3, 6], 50)
    batch = ConversationCollator(pad_id=0, max_length=16, pad_to_multiple_of=8)(samples)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert (batch["labels"][0, 3:] == -100).all()
    assert batch["position_ids"][1, :6].tolist() == list(range(6))

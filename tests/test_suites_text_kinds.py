"""The token suite (wordnet-tags), the instruction-style seq2seq suite (wordnet-instruct) and the
text-to-text architecture (seq2seq-lm, a tiny T5 built from a config) with generation at evaluation."""

from __future__ import annotations

import pytest
import torch

from polytask.errors import PolytaskError
from polytask.kinds import IGNORE
from polytask.metrics import masked_task_losses
from polytask.registry import ARCHITECTURES, SUITES
from polytask.tasks import Batch, InputSpec, MultiTaskData, Task
from hf_helpers import tiny_bert
from polytask.data._wordnet_lex import WORD

pytest.importorskip("transformers")


def _suite(name, **options):
    try:
        return SUITES.create(name, **options)
    except PolytaskError as exc:  # the Debian wordnet-base source or the MiniLM tokenizer is not installed
        if "install" in str(exc).lower():
            pytest.skip(str(exc))
        raise


@pytest.fixture(scope="module")
def tags():
    return _suite("wordnet-tags", subset=60, seq_len=32)


@pytest.fixture(scope="module")
def instruct():
    return _suite("wordnet-instruct", per_task=20, seq_len=32, target_len=8)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    from polytask.models.arch.seq2seq_lm import save_tiny_t5

    root = tmp_path_factory.mktemp("t5")
    return save_tiny_t5(root / "t5", tokenizer=str(tiny_bert(root / "tok")), d_model=32, layers=1, heads=2, d_ff=64)


def _tokenizer():
    from polytask.data.wordnet_tags import text_tokenizer

    return text_tokenizer(None, "test")[0]


# ---------------------------------------------------------------- wordnet-tags (token kind)

def test_headword_and_lexicon_tags_by_hand():
    from polytask.data._wordnet_lex import Synset, exceptions
    from polytask.data.wordnet_tags import LEXPOS, headword_span, lexicon_pos

    try:
        exc = exceptions("test")
    except PolytaskError as exc_:
        pytest.skip(str(exc_))
    dog = Synset(0, "noun", "noun.animal", ("dog", "domestic dog"), "", (), ())
    assert headword_span("the dogs barked at a domestic dog".split(), dog, exc) == [False, True, False, False, False,
                                                                                   True, True]
    run = Synset(0, "verb", "verb.motion", ("run",), "", (), ())
    assert headword_span("he ran and runs".split(), run, exc) == [False, True, False, True]  # exception list, rule
    assert headword_span("a long run".split(), run, exc) == [False, False, True]  # the lemma's form, any sense
    from polytask.data._wordnet_lex import sense_counts

    counts = sense_counts("test")
    assert [LEXPOS[lexicon_pos(w, exc, counts)] for w in ("the", "dogs", "barked", "quickly", "happier")] == \
        ["other", "noun", "verb", "adv", "adj"]


def test_wordnet_tags_labels_sit_on_first_subwords_and_padding_is_ignored(tags):
    tok = _tokenizer()
    assert [(t.name, t.kind, t.num_classes) for t in tags.tasks] == [("headword", "token", 2), ("pos", "token", 4),
                                                                     ("lexpos", "token", 5)]
    data = tags.train
    ids, mask = data.x["input_ids"], data.x["attention_mask"]
    assert data.y["lexpos"].shape == ids.shape == (60, 32)
    specials = set(tok.all_special_ids)
    for i in range(len(data)):
        pieces = tok.convert_ids_to_tokens(ids[i].tolist())
        real = torch.tensor([bool(m) and int(t) not in specials for t, m in zip(ids[i], mask[i])])
        labelled = data.y["lexpos"][i] != IGNORE
        assert labelled[real].any() and not (labelled & ~real).any() and bool(labelled[1])  # [CLS] then a word
        starts = torch.nonzero(labelled).squeeze(1).tolist()
        stop = int(torch.nonzero(real).max()) + 1
        for a, b in zip(starts, starts[1:] + [stop]):  # each labelled piece and its unlabelled followers: one word
            assert WORD.fullmatch("".join(p.removeprefix("##") for p in pieces[a:b])), pieces[a:b]
        assert (data.y["lexpos"][i][mask[i] == 0] == IGNORE).all()  # padding
        if data.mask["pos"][i]:
            head = data.y["headword"][i] == 1
            assert torch.equal(data.y["headword"][i] != IGNORE, labelled) and head.any()
            assert torch.equal(data.y["pos"][i] != IGNORE, head)  # the part of speech only on the headword
            assert int(data.y["pos"][i][head].unique().numel()) == 1
    found = torch.cat([s.mask["pos"] for s in (tags.train, tags.val, tags.test)])
    assert torch.equal(found, torch.cat([s.mask["headword"] for s in (tags.train, tags.val, tags.test)]))
    assert found.float().mean() > 0.9


def test_wordnet_tags_missing_labels_do_not_reach_the_loss(tags):
    tasks = tags.tasks
    batch = next(tags.train.batches(60))
    g = torch.Generator().manual_seed(0)
    out = {t.name: torch.randn(60, 32, t.num_classes, generator=g) for t in tasks}
    losses = masked_task_losses(tasks, out, batch)
    pos = tasks[1]
    keep = batch.mask["pos"]
    assert torch.allclose(losses[1], pos.loss(out["pos"], batch.y["pos"])[keep].mean())
    ignored = (batch.y["pos"] == IGNORE)[..., None]
    noise = 5 * torch.randn(out["pos"].shape, generator=g)
    changed = {**out, "pos": torch.where(ignored, out["pos"] + noise, out["pos"])}
    unlabelled = ~keep
    changed["pos"][unlabelled] = 0.0  # samples without the task altogether
    assert torch.allclose(masked_task_losses(tasks, changed, batch)[1], losses[1])


# ---------------------------------------------------------------- wordnet-instruct (seq2seq kind)

def test_wordnet_instruct_instructions_targets_and_masks(instruct):
    from polytask.data.wordnet_instruct import INSTRUCTIONS

    tok = _tokenizer()
    assert instruct.task_names == ["define", "hypernym", "antonym", "reverse"]
    assert all(t.kind == "seq2seq" and t.num_classes == len(tok) for t in instruct.tasks)
    data = instruct.train
    owners = torch.stack([data.mask[t] for t in instruct.task_names], 1)
    assert (owners.sum(1) == 1).all()  # one task per sample
    end = tok.sep_token_id
    for i in range(len(data)):
        task = instruct.task_names[int(owners[i].float().argmax())]
        text = tok.decode(data.x["input_ids"][i], skip_special_tokens=True)
        assert text.startswith(tok.decode(tok(INSTRUCTIONS[task].format(""))["input_ids"], skip_special_tokens=True))
        y = data.y[task][i]
        real = y[y != IGNORE]
        assert int(real[-1]) == end and (y[len(real):] == IGNORE).all()
        assert torch.equal(data.x["target_ids"][i], torch.where(y == IGNORE, tok.pad_token_id, y))
        for other in instruct.task_names:
            if other != task:
                assert (data.y[other][i] == IGNORE).all()
        if task == "reverse":
            words = tok.decode(real[:-1]).split()
            assert " ".join(reversed(words)) == text.split(": ", 1)[1]
    assert max(int((data.y[t] != IGNORE).sum(1).max()) for t in instruct.task_names) <= 8  # no target cut short


def test_instruction_pairs_from_hand_made_synsets():
    from polytask.data._wordnet_lex import Synset
    from polytask.data.wordnet_instruct import task_pairs

    table = [Synset(10, "noun", "noun.animal", ("dog", "domestic dog"), "a member of the genus canis", (),
                    ("@", "00000020", "n", "0000")),
             Synset(20, "noun", "noun.animal", ("canine",), "a carnivore", (), ()),
             Synset(30, "adj", "adj.all", ("good",), "having desirable qualities", (), ("!", "00000040", "a", "0101")),
             Synset(40, "adj", "adj.all", ("bad",), "having undesirable qualities", (), ("!", "00000030", "a", "0101"))]
    pairs = task_pairs(table, 0, 10)
    assert pairs["hypernym"] == [("dog", "canine")] and sorted(pairs["antonym"]) == [("bad", "good"), ("good", "bad")]
    assert sorted(pairs["define"]) == sorted((s.definition, s.lemmas[0]) for s in table)
    for source, target in pairs["reverse"]:
        assert target.split() == source.split()[::-1] and 3 <= len(source.split()) <= 5
        assert any(source in s.definition for s in table)


# ---------------------------------------------------------------- seq2seq-lm (tiny T5) with generation

SPEC = InputSpec("tokens", seq_len=6)


def _pairs(t5, n_tasks=2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(t5))
    texts, targets = ["the dog runs", "a cat sleeps", "the big bird sings", "a red car"], \
        ["dog runs", "cat", "bird sings big", "red car"]
    enc = tok(texts, padding="max_length", max_length=6, truncation=True, return_tensors="pt")
    ys = torch.full((4, 5), IGNORE)
    for i, t in enumerate(targets):
        ids = tok(t, add_special_tokens=False)["input_ids"] + [tok.sep_token_id]
        ys[i, :len(ids)] = torch.tensor(ids)
    x = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
         "target_ids": torch.where(ys == IGNORE, tok.pad_token_id, ys)}
    names = ["a", "b"][:n_tasks]
    owner = torch.tensor([0, 1, 0, 1]) % n_tasks
    tasks = [Task(n, "seq2seq", num_classes=len(tok), metrics=("exact_match", "bleu")) for n in names]
    data = MultiTaskData(x, {n: torch.where((owner == k)[:, None], ys, IGNORE) for k, n in enumerate(names)},
                         {n: owner == k for k, n in enumerate(names)})
    return tasks, data, ys


def _model(t5, tasks, **opts):
    torch.manual_seed(0)
    return ARCHITECTURES.create("seq2seq-lm", tasks, SPEC, path=str(t5), **opts)


def test_teacher_forcing_is_causal_and_a_training_step_lowers_the_loss(t5):
    tasks, data, _ = _pairs(t5)
    model = _model(t5, tasks)
    batch = next(data.batches(4))
    out = model(batch.x)["a"]
    assert out.shape == (4, 5, model.vocab_size) and model.task_specific_parameters() == []
    changed = {**batch.x, "target_ids": batch.x["target_ids"].clone()}
    changed["target_ids"][:, 2] = 7  # the decoder reads the target shifted right: positions <= 2 do not see it
    out2 = model(changed)["a"]
    assert torch.allclose(out2[:, :3], out[:, :3], atol=1e-6)
    assert not torch.allclose(out2[:, 3], out[:, 3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = masked_task_losses(tasks, model(batch.x), batch).sum()
    for _ in range(5):
        opt.zero_grad()
        masked_task_losses(tasks, model(batch.x), batch).sum().backward()
        opt.step()
    assert float(masked_task_losses(tasks, model(batch.x), batch).sum().detach()) < 0.8 * float(first.detach())


def test_eval_outputs_are_greedy_generations_scored_by_exact_match_and_bleu(t5):
    from polytask.trainer import evaluate_model

    tasks, data, ys = _pairs(t5, n_tasks=1)
    model = _model(t5, tasks)
    x = next(data.batches(4)).x
    model.eval()
    with torch.no_grad():
        ours = model(x)["a"].argmax(-1)
        ref = model.backbone.lm.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                                         max_new_tokens=5, do_sample=False)[:, 1:]
    for i in range(4):  # the same tokens up to the end token, which then repeats
        n = ref.shape[1] if not (ref[i] == model.end).any() else int((ref[i] == model.end).float().argmax()) + 1
        assert torch.equal(ours[i, :n], ref[i, :n]) and (ours[i, n:] == model.end).all()
    # overfit the four pairs, then greedy generation reproduces them
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    batch = next(data.batches(4))
    for _ in range(60):
        opt.zero_grad()
        masked_task_losses(tasks, model(batch.x), batch).sum().backward()
        opt.step()
    assert evaluate_model(model, tasks, data)["a"]["exact_match"] == 1.0
    # references edited by hand: sample 1 "cat" -> "dog" (a 2-token sequence with one miss), the rest exact
    edited = ys.clone()
    edited[1, 0] = int(ys[0, 0])  # "dog"
    r = evaluate_model(model, tasks, MultiTaskData(data.x, {"a": edited}))["a"]
    assert r["exact_match"] == 0.75
    # corpus BLEU-4 over token ids, ends included (lengths 3, 2, 4, 3; sample 1 predicts "cat END" for "dog END"):
    # 1-grams 11/12 hit, 2-grams 7/8, 3-grams 4/4 (none in sample 1), 4-grams 1/1; brevity penalty 1
    assert r["bleu"] == pytest.approx((11 / 12 * 7 / 8 * 4 / 4 * 1 / 1) ** 0.25, abs=1e-5)
    teacher = _model(t5, tasks, generate=False)
    teacher.load_state_dict(model.state_dict())
    free = evaluate_model(model, tasks, data)["a"]["loss"]
    assert evaluate_model(teacher, tasks, data)["a"]["loss"] == pytest.approx(free, rel=1e-4)  # right prefixes


def test_seq2seq_lm_refuses_bad_input(t5):
    tasks, data, _ = _pairs(t5)
    with pytest.raises(PolytaskError, match="not a seq2seq task"):
        _model(t5, [Task("c", "binary")])
    with pytest.raises(PolytaskError, match="path="):
        ARCHITECTURES.create("seq2seq-lm", tasks, SPEC)
    with pytest.raises(PolytaskError, match="vocabulary larger"):
        _model(t5, [Task("c", "seq2seq", num_classes=30522)])
    model = _model(t5, tasks)
    with pytest.raises(PolytaskError, match="target_ids"):
        model({"input_ids": data.x["input_ids"], "attention_mask": data.x["attention_mask"]})
    with pytest.raises(PolytaskError, match="outside the model's vocabulary"):
        model({**data.x, "input_ids": data.x["input_ids"] + 1000})


def test_seq2seq_lm_with_a_shared_lora_adapter_trains_only_the_adapter(t5):
    pytest.importorskip("peft")
    tasks, data, _ = _pairs(t5)
    model = _model(t5, tasks, finetune="lora", r=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    batch = next(data.batches(4))
    masked_task_losses(tasks, model(batch.x), batch).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---------------------------------------------------------------- both suites through the Trainer

def test_task_lora_trains_on_the_token_suite_and_seq2seq_lm_on_the_instruction_suite(t5):
    pytest.importorskip("peft")
    from polytask import TrainConfig, Trainer
    from polytask.trainer import evaluate_model

    tok = str(t5)  # the tiny T5 folder holds the tiny WordPiece tokenizer (words outside it become [UNK])
    tags = _suite("wordnet-tags", subset=24, seq_len=16, tokenizer=tok)
    torch.manual_seed(0)
    model = ARCHITECTURES.create("task-lora", tags.tasks, tags.input_spec, backbone="hf",
                                 backbone_options={"path": str(tiny_bert(t5.parent / "bert"))}, r=2)
    Trainer(model, tags.tasks, "ew", TrainConfig(epochs=1, batch_size=8, progress=False)).fit(tags.train)
    r = evaluate_model(model, tags.tasks, tags.test)
    assert set(r) == {"headword", "pos", "lexpos"} and all(0 <= r[t]["accuracy"] <= 1 for t in r)
    instruct = _suite("wordnet-instruct", per_task=8, seq_len=16, target_len=6, tokenizer=tok)
    model = _model(t5, instruct.tasks)
    Trainer(model, instruct.tasks, "ew", TrainConfig(epochs=1, batch_size=8, progress=False)).fit(instruct.train)
    r = evaluate_model(model, instruct.tasks, instruct.test, batch_size=8)
    assert set(r) == set(instruct.task_names) and all(set(r[t]) == {"exact_match", "bleu", "loss"} for t in r)


def test_seq2seq_lm_keeps_the_gradient_contract(t5):
    """All weights are shared; the representation cut (encoder input embeddings) plus the path above it
    reproduce the full backward, and a GradContext update in either mode equals the weighted backward."""
    from polytask.weighting.base import GradContext

    tasks, data, _ = _pairs(t5)
    model = _model(t5, tasks)
    x = next(data.batches(4))
    assert model.task_specific_parameters() == [] and len(model.shared_parameters()) == len(list(model.parameters()))
    w = torch.tensor([0.3, 2.0])
    model.zero_grad(set_to_none=True)
    (w * masked_task_losses(tasks, model(x.x), x)).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    for mode in ("params", "rep"):
        model.zero_grad(set_to_none=True)
        ctx = GradContext(model, mode)
        with model.representation_cut() if mode == "rep" else torch.enable_grad():
            losses = masked_task_losses(tasks, model(x.x), x)
        if mode == "rep":
            assert model.rep_leaf is not None and model.last_rep.shape == (4, 6, 32)
        ctx.task_grads(losses)
        ctx.apply(losses, w)
        for n, p in model.named_parameters():
            assert torch.allclose(p.grad, expected[n], atol=1e-6, rtol=1e-4), (mode, n)

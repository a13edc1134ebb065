"""The task registry: templates, builders, inference and the invariants every registered task keeps."""

import pytest

from chameleon_ft.data.errors import BadSampleError, DataConfigError
from chameleon_ft.data.sample import ImageRef
from chameleon_ft.tasks import SampleContext, build_sample, get_task, infer_task, task_names


def test_every_task_is_consistent():
    assert {"captioning", "vqa", "text_to_image", "chat", "interleaved"} <= set(task_names())
    for name in task_names():
        t = get_task(name)
        assert t.name == name and t.monitor.startswith("val/") and t.monitor_mode in ("max", "min")
        assert t.key_field in t.fields
        if t.prompt_template is not None:
            assert t.template(None) == t.prompt_template  # the default satisfies its own placeholders
        assert (t.score is None) == (t.output != "text")  # generated text is scored; images are looked at


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(DataConfigError, match=r"task='vqa2' is not a task; choose one of .*captioning.*vqa"):
        get_task("vqa2")


def test_task_templates():
    ctx = SampleContext("f.jsonl", 3, prompt_template="Q: {question}")
    conv = get_task("vqa").conversation({"image": ImageRef(path="x.png"), "question": "How many?", "answer": "2"}, ctx)
    assert conv.turns[0].segments[1].text == "Q: How many?"
    assert conv.meta["answers"] == ["2"] and conv.task == "vqa"
    with pytest.raises(DataConfigError, match="question"):
        get_task("vqa").conversation({"image": ImageRef(path="x.png"), "question": "How many?", "answer": "2"},
                                     SampleContext(prompt_template="no field"))
    t2i = get_task("text_to_image").conversation({"prompt": "a red square", "image": ImageRef(path="x.png"),
                                                  "width": 64, "height": 32}, SampleContext())
    assert t2i.turns[0].text == "Generate an image of 64x32 according to the following prompt:\na red square"
    assert t2i.turns[1].role == "assistant" and t2i.turns[1].images == [ImageRef(path="x.png")]
    assert t2i.meta["prompt"] == "a red square"


def test_prompt_is_the_conversation_without_its_answer():
    image = ImageRef(path="x.png")
    cases = {"vqa": {"image": image, "question": "Odd?", "answer": "no"},
             "captioning": {"image": image, "caption": "a digit"},
             "text_to_image": {"image": image, "prompt": "a digit"},
             "interleaved": {"image": image, "instruction": "Name it and draw it", "response": "seven"},
             "chat": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}}
    for name, fields in cases.items():
        task = get_task(name)
        conv = task.conversation(fields, SampleContext())
        assert task.prompt(fields, SampleContext()) == conv.turns[:-1], name
    caption = get_task("captioning")
    assert caption.prompt({"image": ImageRef(path="x.png")}, SampleContext())[0].text == "Describe the image briefly."


def test_interleaved_answer_is_text_then_image():
    image = ImageRef(path="x.png")
    conv = get_task("interleaved").conversation({"instruction": "Name it and draw it", "response": "seven",
                                                 "image": image}, SampleContext())
    assert [t.role for t in conv.turns] == ["user", "assistant"] and conv.turns[0].text == "Name it and draw it"
    assert [(s.text, s.image) for s in conv.turns[1].segments] == [("seven", None), (None, image)]
    assert infer_task({"response": "seven"}) == "interleaved"


def test_missing_field_error_names_the_keys_the_record_has():
    with pytest.raises(BadSampleError) as ei:
        get_task("vqa").conversation({"image": ImageRef(path="x.png"), "q": "Odd?", "_keys": ["image", "q"]},
                                     SampleContext("d.jsonl", 4))
    err = ei.value
    assert (err.file, err.record, err.reason) == ("d.jsonl", 4, "missing_field")
    assert "['image', 'q']" in err.detail and "data.columns.question" in err.detail


def test_infer_task_by_key_field_and_ambiguity():
    assert infer_task({"question": "q", "image": "x"}) == "vqa"
    assert infer_task({"caption": "c"}) == "captioning"
    assert infer_task({"prompt": "p"}) == "text_to_image"
    assert infer_task({"conversations": []}) == "chat"
    assert infer_task({"image": "x"}) is None
    with pytest.raises(DataConfigError, match="several tasks"):
        infer_task({"question": "q", "caption": "c"})


def test_conversation_records_become_samples_of_the_run_task():
    fields = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}], "images": []}
    conv = build_sample(get_task("vqa"), fields, SampleContext("c.json", 0))
    assert conv.task == "vqa" and [t.role for t in conv.turns] == ["user", "assistant"]

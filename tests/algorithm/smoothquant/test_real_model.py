"""The issue's quickstart, offline, on the real pretrained stories260K Llama and WikiText-2 lines."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tico.experimental.quantization import convert, get_quantizer, prepare
from tico.experimental.quantization.config.smoothquant import SmoothQuantConfig


def test_quickstart_on_real_model(stories_dir, wikitext_valid, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    lines = [line for line in wikitext_valid.read_text().splitlines() if len(line.split()) > 8]
    device = next(model.parameters()).device
    probe = tokenizer(lines[50], return_tensors="pt").input_ids
    with torch.no_grad():
        reference = model(probe).logits
        greedy_ref = model.generate(probe[:, :12], max_new_tokens=12, do_sample=False)

    norms_before = {n: p.clone() for n, p in model.named_parameters() if n.endswith("layernorm.weight")}
    model = prepare(model, SmoothQuantConfig())
    for i in range(10):
        input_ids = tokenizer(lines[i], return_tensors="pt").input_ids.to(device)
        model(input_ids)
    q_m = convert(model)

    plan = get_quantizer(model).plan if "_tico_quantizer" in model.__dict__ else None
    assert plan is None  # convert removed its state from the model
    layers = q_m.config.num_hidden_layers
    changed = [n for n, p in q_m.named_parameters() if n in norms_before and not torch.equal(p, norms_before[n])]
    assert len(changed) == len(norms_before) == 2 * layers
    with torch.no_grad():
        out = q_m(probe).logits
        greedy = q_m.generate(probe[:, :12], max_new_tokens=12, do_sample=False)
    assert float((out - reference).abs().max() / reference.abs().max()) < 1e-5
    assert torch.equal(greedy, greedy_ref)

    q_m.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(probe).logits, out)


def test_real_model_plan_lists_every_block(stories_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    before = {n: p.clone() for n, p in model.named_parameters()}
    model = prepare(model, SmoothQuantConfig())
    plan = get_quantizer(model).plan
    assert len(plan.smoothed) == 2 * model.config.num_hidden_layers
    (head,) = plan.skipped  # the tied LM head is left alone, with the reason
    assert head.producer == "model.norm" and "output embedding" in head.reason
    assert "model.layers.4:" in plan.summary()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # prepare changes no weight

"""Where float32 greedy tokens part, and whether the reference model stood at a near-tie there: the
bench's explanation of a float32 mismatch, checked against transformers' own logits."""

from __future__ import annotations

from pathlib import Path

import torch

from kvloom.bench import throughput
from kvloom.bench.analysis.divergence import Divergence, first_divergences
from kvloom.bench.peers import PeerRun, load_hf_model, parse_peers


def _greedy(model: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return list(out[0, len(prompt):].tolist())


def test_the_first_divergence_reads_the_reference_models_logits_there(llama_dir: Path) -> None:
    model = load_hf_model(llama_dir, "float32")
    prompts = [[5, 9, 14, 3], [7, 7, 2]]
    reference = [_greedy(model, p, 6) for p in prompts]
    other = [list(t) for t in reference]
    other[1][3] = (reference[1][3] + 1) % model.config.vocab_size  # parts at generated token 3
    found = first_divergences(model, prompts, reference, other, [0, 1])
    assert [(d.request, d.position, d.reference_token, d.other_token) for d in found] == [
        (1, 3, reference[1][3], other[1][3])]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompts[1] + reference[1][:3]])).logits[0, -1].double()
    d = found[0]
    assert d.reference_logit == float(logits[reference[1][3]]) and d.other_logit == float(logits[other[1][3]])
    assert d.gap > 0, "greedy: the reference's own token has the larger logit"


def test_a_few_ulp_is_a_near_tie_and_a_real_gap_is_not() -> None:
    tie = Divergence(62, 43, 21931, 8159, 8.227605819702148, 8.227602005004883)  # seen on an AMX Xeon
    assert tie.near_tie and "a near-tie" in tie.describe() and "request 62" in tie.describe()
    wrong = Divergence(3, 0, 1, 2, 8.0, 7.5)
    assert not wrong.near_tie and "NOT a near-tie" in wrong.describe()
    assert tie.to_json()["near_tie"] is True and wrong.to_json()["gap"] == 0.5


def test_the_throughput_report_explains_each_float32_mismatch_once(llama_dir: Path) -> None:
    model = load_hf_model(llama_dir, "float32")
    prompts = [[5, 9, 14, 3], [7, 7, 2], [11, 4]]
    peer_tokens = [_greedy(model, p, 4) for p in prompts]
    kvloom_tokens = [list(t) for t in peer_tokens]
    kvloom_tokens[2][1] = (peer_tokens[2][1] + 3) % model.config.vocab_size
    specs = parse_peers("static8,static16,static8@bf16")
    runs = {s.name: [PeerRun(1.0, peer_tokens, None)] for s in specs}
    entries = [{"error": None, "mismatched_requests": [2]}, {"error": None, "mismatched_requests": [2]},
               {"error": None, "mismatched_requests": [0, 1, 2]}]
    found = throughput.float32_divergences(specs, runs, ("kvloom@fp32", kvloom_tokens), model, entries, prompts)
    assert [(d["peer"], d["request"], d["position"]) for d in found] == [("static8", 2, 1)]  # bf16 peers: not float32
    assert found[0]["near_tie"] is False and "NOT a near-tie" in found[0]["description"]
    assert throughput.float32_divergences(specs, runs, None, model, entries, prompts) == []

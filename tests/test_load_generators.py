"""Load generators nobody here wrote (NVIDIA aiperf, guidellm) against one `pdserve up` deployment (router +
1 prefill + 1 decode): every request succeeds and the tools' token counts agree with pdserve's own.

Each tool runs from its venv under `.venv-tools/` (`make loadgen`, which `make test` runs first), offline, with a
small bounded load: 16 streaming chat requests, 64 input tokens, 16 output tokens forced by ignore_eos, 4 in
flight. Checked per tool:

- the tool's export: 16 requests, none failed (the decode and the prefill each finished 16, aborted none);
- output tokens, exactly: each request's `usage.completion_tokens` as the tool recorded it is 16, and the decode
  server's `sglang:generation_tokens_total` grew by 16 x 16; the tool's own count is guidellm's usage (16) or
  aiperf's tokenization of the text it received (exactly that; it can be less than 16, since special tokens
  generated past EOS under ignore_eos are not in the text);
- input tokens, exactly: `sglang:prompt_tokens_total` grew on the decode and on the prefill (in PD both count
  each prompt) by the sum of the tool's recorded `usage.prompt_tokens`, and each of those is the token count of
  the request's messages (from the bodies the tool exported) rendered through the model's chat template;
- the tool's own input count: aiperf's is the bare prompt text's (checked exactly), guidellm's is the usage.
  Every bare prompt is 64 +- 2 tokens, and pdserve's count exceeds it by the chat template's tokens (SmolLM2: a
  default system prompt, role headers and the assistant prefix, 30 tokens) +- 2 (a merge where the prompt meets
  the template's text), never more.

No timing is asserted: the tools' timeouts are generous and a slow machine only makes the test longer.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests import loadgen_helpers as lg

LOAD = lg.Load(num_requests=16, input_len=64, output_len=16, concurrency=4)
BOUNDARY_TOKENS = 2  # per request: how far a bare-text count may move when the chat template wraps it


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, request):
    if not any(lg.tool_exe(t) for t in lg.RUNNERS):
        pytest.skip(f"no load generator installed under {lg.TOOLS_DIR} (run `make loadgen`)")
    root = tmp_path_factory.mktemp("loadgen-up")
    dep = lg.start_up(str(root / "logs"), "--max-total-tokens", "4096")
    failed_before = request.session.testsfailed
    try:
        yield dep
    finally:
        dep.stop()
        if request.session.testsfailed > failed_before:
            print(f"\n----- pdserve up logs -----\n{dep.logs()}", file=sys.stderr)


@pytest.fixture(scope="module")
def prompts(deployment):
    return lg.PromptCounter(deployment.tokenizer_path)


def _workers(dep: lg.UpDeployment) -> dict[str, str]:
    assert len(dep.prefill_urls) == 1 and len(dep.decode_urls) == 1, (dep.prefill_urls, dep.decode_urls)
    return {"prefill": dep.prefill_urls[0], "decode": dep.decode_urls[0]}


@pytest.mark.parametrize("tool", sorted(lg.RUNNERS))
def test_load_generator_succeeds_and_token_counts_match_pdserve_counters(tool, deployment, prompts, tmp_path):
    if lg.tool_exe(tool) is None:
        pytest.skip(f"{tool} is not installed in {os.path.join(lg.TOOLS_DIR, tool)} (run `make loadgen`)")
    workers = _workers(deployment)
    before = {name: lg.counters(url) for name, url in workers.items()}
    result = lg.RUNNERS[tool](deployment, LOAD, str(tmp_path / tool), timeout=1800)
    delta = {name: lg.counter_delta(before[name], lg.counters(url)) for name, url in workers.items()}
    n, out_len = LOAD.num_requests, LOAD.output_len

    # every request succeeded, by the tool's summary and by its per-request export
    assert (result.completed, result.failed) == (n, 0), (result.completed, result.failed, result.extra)
    assert len(result.rows) == n and not [r.error for r in result.rows if r.error]
    for name in ("prefill", "decode"):
        assert delta[name]["num_requests_total"] == n, (name, delta)
        assert delta[name]["num_aborted_requests_total"] == 0, (name, delta)

    # output tokens: fixed length, exactly, in the tool's record of usage and in the decode's counter
    assert [r.usage_completion_tokens for r in result.rows] == [out_len] * n
    assert delta["decode"]["generation_tokens_total"] == n * out_len
    if tool == "aiperf":
        # aiperf counts the streamed text with the model's tokenizer: exactly that, which can be below the usage
        # (special tokens generated past EOS under ignore_eos are not in the text) or off by a re-tokenization
        assert [r.tool_output_tokens for r in result.rows] == [prompts.text(r.output_text) for r in result.rows]
    else:  # guidellm's count is the server's usage
        assert [r.tool_output_tokens for r in result.rows] == [out_len] * n

    # input tokens: pdserve's counters = the tool's record of usage = the chat template over the tool's messages
    templated = [prompts.chat(r.messages) for r in result.rows]
    assert delta["decode"]["prompt_tokens_total"] == delta["prefill"]["prompt_tokens_total"] == sum(templated)
    assert [r.usage_prompt_tokens for r in result.rows] == templated

    # the prompts are of the asked length as bare text; pdserve's count adds the chat template's tokens, only those
    overhead = prompts.template_overhead()
    assert overhead > 0
    for row, server_count in zip(result.rows, templated):
        bare = prompts.text(row.messages[-1]["content"])
        if tool == "aiperf":  # aiperf's own input count is the bare prompt text's, by the same tokenizer
            assert row.tool_input_tokens == bare
        else:  # guidellm's is the server's usage
            assert row.tool_input_tokens == server_count
        assert abs(bare - LOAD.input_len) <= BOUNDARY_TOKENS, (bare, row.messages)
        assert abs(server_count - bare - overhead) <= BOUNDARY_TOKENS, (server_count, bare, overhead)

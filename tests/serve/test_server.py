"""`sdrun serve` on the tiny bundle, a real Triton server on 127.0.0.1: health and metrics answer, 32
requests from 8 clients each get the image `sdrun txt2img` makes, bad requests get our message and do
not harm the next, a dropped client does not stop it, and SIGTERM answers what is in flight, exit 0."""
from __future__ import annotations

import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton (the serve extra) is not installed")

from sdrun.errors import UserError  # noqa: E402
from sdrun.serve.client import remote_generate, request_tensors  # noqa: E402
from benchmarks.server_process import running_server  # noqa: E402

STEPS = 3
PIXEL = 1  # uint8 levels between a served image (batched with others) and the same request run alone
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with running_server(tiny_bundle, log, "--max-queue-delay-ms", "20", models=("txt2img", "img2img")) as running:
        yield running


@pytest.fixture(scope="module")
def local(tiny_bundle):
    from sdrun.session import load_pipeline

    return load_pipeline(tiny_bundle, "onnxruntime")


def ask(server, **values):
    return remote_generate(server.url, "txt2img", request_tensors("txt2img", values), TIMEOUT_S)


def test_readiness_and_metrics_answer(server):
    assert server.get("/v2/health/ready")[0] == 200
    status, body = server.get("/v2/models/txt2img/config")
    assert status == 200 and json.loads(body)["max_batch_size"] == 0
    status, metrics = server.get("/metrics", port=server.metrics)
    assert status == 200 and "nv_inference_request_success" in metrics


def test_image_quality_counters_are_served_beside_triton_metrics(server):
    ask(server, prompt="a counted one", steps=2)
    status, text = server.get("/metrics", port=server.metrics + 1)
    assert status == 200, text
    counts = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("sdrun_"))
    assert int(counts['sdrun_images_total{model="txt2img"}']) >= 1
    assert counts['sdrun_image_quality_total{model="txt2img",signal="black"}'] == "0"


def test_32_requests_from_8_clients_each_equal_a_local_run(server, local):
    from sdrun.generate import result_parameters
    from sdrun.pipeline import GenerationRequest

    jobs = [{"prompt": f"a lighthouse number {i % 5}", "negative_prompt": "blurry" if i % 2 else "", "seed": i,
             "steps": STEPS, "sampler": ("ddim", "euler_a")[i % 2]} for i in range(32)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: ask(server, **job), jobs))
    for job, (image, parameters) in zip(jobs, answers):
        result = local.pipeline.generate(GenerationRequest(**job))
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert np.abs(image.astype(int) - result.images[0]).max() <= PIXEL, job
        assert parameters == result_parameters(result, local.pipeline.bundle, "onnxruntime", img2img=False)


BAD_REQUESTS = {
    "missing prompt": ({"steps": STEPS}, "has no prompt"),
    "steps 0": ({"prompt": "a", "steps": 0}, "steps must be a positive integer"),
    "size outside the profile": ({"prompt": "a", "height": 4096}, "outside the bundle's profile"),
    "unknown sampler": ({"prompt": "a", "sampler": "no such sampler"}, "sampler"),
    "1 MB prompt": ({"prompt": "a" * 2**20}, "bytes long"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_a_bad_request_gets_our_message_and_the_next_succeeds(server, name):
    values, message = BAD_REQUESTS[name]
    with pytest.raises(UserError, match=message):
        ask(server, **values)
    assert ask(server, prompt="a good one", steps=2)[0].shape == (64, 64, 3)


def test_a_wrong_dtype_is_refused_by_name_and_the_next_succeeds(server):
    import urllib.error
    import urllib.request

    body = {"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a"]},
                       {"name": "steps", "shape": [1], "datatype": "FP32", "data": [2.5]}]}
    post = urllib.request.Request(f"{server.url}/v2/models/txt2img/infer", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(post, timeout=TIMEOUT_S)
    message = json.loads(refused.value.read())["error"]
    assert refused.value.code == 400 and "steps" in message and "INT32" in message, message
    assert ask(server, prompt="a good one", steps=2)[0].shape == (64, 64, 3)


def test_a_client_that_disconnects_mid_request_does_not_stop_the_server(server):
    body = json.dumps({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["gone"]},
                                  {"name": "steps", "shape": [1], "datatype": "INT32", "data": [20]}]}).encode()
    with socket.create_connection(("127.0.0.1", server.http), timeout=5) as connection:
        connection.sendall(b"POST /v2/models/txt2img/infer HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    assert ask(server, prompt="still here", steps=2)[0].shape == (64, 64, 3)
    assert server.get("/v2/health/live")[0] == 200


def test_img2img_is_served_when_the_bundle_has_the_encoder(server, tiny_bundle):
    from sdrun.pipeline import GenerationRequest
    from sdrun.session import load_pipeline

    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    values = {"prompt": "a house", "image": image, "strength": 0.5, "steps": 4, "seed": 2}
    served, _ = remote_generate(server.url, "img2img", request_tensors("img2img", values), TIMEOUT_S)
    pipeline = load_pipeline(tiny_bundle, "onnxruntime", img2img=True).pipeline
    as_float = (image.astype(np.float32) / 127.5 - 1.0).transpose(2, 0, 1)[None]
    alone = pipeline.generate(GenerationRequest("a house", steps=4, seed=2, image=as_float, strength=0.5))
    assert np.abs(served.astype(int) - alone.images[0]).max() <= PIXEL


def test_sigterm_answers_the_requests_in_flight_and_exits_0(server):
    answers = []
    clients = [threading.Thread(target=lambda s=s: answers.append(ask(server, prompt="last", steps=10, seed=s)))
               for s in range(3)]
    for client in clients:
        client.start()
    threading.Event().wait(1.0)  # the requests are in the server
    assert server.stop() == 0
    for client in clients:
        client.join(TIMEOUT_S)
    assert len(answers) == 3 and all(image.shape == (64, 64, 3) for image, _ in answers)


def test_an_sdxl_bundle_is_served_through_the_same_contract(released_twin, tmp_path):
    """tiny-xl: two encoders, pooled text and size conditioning behind the unchanged request contract; four
    requests from two clients (batched together) each equal a local run."""
    from sdrun.generate import result_parameters
    from sdrun.pipeline import GenerationRequest
    from sdrun.session import load_pipeline

    bundle = released_twin("tiny-xl").bundle
    jobs = [{"prompt": f"a lighthouse number {i}", "negative_prompt": "blurry", "seed": i, "steps": STEPS}
            for i in range(4)]
    with running_server(bundle, tmp_path / "serve.log", "--max-queue-delay-ms", "20", models=("txt2img",)) as xl:
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda job: ask(xl, **job), jobs))
    local = load_pipeline(bundle, "onnxruntime").pipeline
    for job, (image, parameters) in zip(jobs, answers):
        result = local.generate(GenerationRequest(**job))
        assert np.abs(image.astype(int) - result.images[0]).max() <= PIXEL, job
        assert parameters == result_parameters(result, local.bundle, "onnxruntime", img2img=False)

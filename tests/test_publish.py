"""push_to_hub against a Hub on loopback: a small HTTP server speaking the part of the Hub's API that
huggingface_hub's create_repo / upload_folder use (whoami, repo creation, preupload, commit), so the real
client code runs and the test reads back exactly which files each commit carried."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rloo import train
from test_train_e2e import tiny_config


class FakeHub(BaseHTTPRequestHandler):
    commits: list[dict] = []
    created: list[dict] = []
    unknown: list[str] = []

    def log_message(self, *args):  # quiet
        pass

    def _reply(self, status: int, body) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        if self.path.startswith("/api/whoami-v2"):
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if token not in ("hf_test_token", "hf_read_token"):
                return self._reply(401, {"error": "Invalid credentials"})
            role = "read" if token == "hf_read_token" else "write"
            return self._reply(200, {"type": "user", "name": "tester",
                                     "auth": {"type": "access_token", "accessToken": {"role": role}}})
        if "/tree/" in self.path:  # the files already there (every_save replaces last-checkpoint/): none
            return self._reply(200, [])
        self._reply(404, {"error": "not here"})  # huggingface_hub's optional lookups (agent harnesses, say)

    def do_POST(self):
        body = self._body()
        parts = self.path.split("?")[0].strip("/").split("/")
        if self.path.startswith("/api/validate-yaml"):  # the model card's metadata
            return self._reply(200, {"errors": [], "warnings": []})
        if self.path.startswith("/api/repos/create"):
            FakeHub.created.append(json.loads(body))
            name = json.loads(body)["name"]
            return self._reply(200, {"url": f"http://{self.headers['Host']}/tester/{name}", "name": name})
        if parts[:2] == ["api", "models"] and parts[4:5] == ["preupload"]:
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                               for f in files], "commitOid": "0" * 40})
        if parts[:2] == ["api", "models"] and parts[4:5] == ["commit"]:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = {line["value"]["path"]: base64.b64decode(line["value"]["content"])
                     for line in lines if line["key"] == "file"}
            header = next(line["value"] for line in lines if line["key"] == "header")
            FakeHub.commits.append({"repo": f"{parts[2]}/{parts[3]}", "message": header["summary"], "files": files})
            url = f"http://{self.headers['Host']}/{parts[2]}/{parts[3]}/commit/{'1' * 40}"
            return self._reply(200, {"commitUrl": url, "commitOid": "1" * 40})
        FakeHub.unknown.append(f"POST {self.path}")
        self._reply(404, {"error": "not here"})


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)  # HF_ENDPOINT and HF_HUB_OFFLINE=0, read at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    FakeHub.commits, FakeHub.created, FakeHub.unknown = [], [], []
    yield endpoint
    server.shutdown()


def test_push_to_hub_uploads_each_checkpoint_then_the_run_folder(tiny_model_dir, tmp_path, hub):
    out = tmp_path / "tiny-rloo"
    train(tiny_config(tiny_model_dir, out, max_steps=2, save_steps=1, push_to_hub=True, hub_token="hf_test_token",
                      hub_private_repo=True))
    assert FakeHub.unknown == [] and FakeHub.created[0]["name"] == "tiny-rloo" and FakeHub.created[0].get("visibility", FakeHub.created[0].get("private")) in ("private", True), FakeHub.created
    checkpoints, final = FakeHub.commits[:-1], FakeHub.commits[-1]
    assert all(c["repo"] == "tester/tiny-rloo" for c in FakeHub.commits)
    assert 1 <= len(checkpoints) <= 2  # a save while the previous upload runs is skipped
    for commit in checkpoints:  # the newest checkpoint with the reference policy: a download resumes (beta 0.05)
        steps = {name.split("/")[1] for name in commit["files"] if name.startswith("checkpoints/step-")}
        assert len(steps) == 1 and {f"checkpoints/{steps.pop()}/COMMITTED", "checkpoints/reference/model.safetensors",
                                    "checkpoints/reference/COMMITTED"} <= set(commit["files"])
    files = final["files"]
    for name in ("model.safetensors", "config.json", "README.md", "report.html", "plots/reward.png", "metrics.jsonl",
                 "completions.jsonl", "eval.json", "config.yaml"):
        assert files[name] == (out / name).read_bytes(), name
    assert not any(name.startswith((".rloo", "checkpoints/", ".tmp-final", "wandb/")) for name in files)
    card = files["README.md"].decode()
    assert "model='tester/tiny-rloo'" in card and str(tmp_path) not in card
    assert b"hf_test_token" not in files["config.yaml"]  # the token is never written


def test_a_bad_or_read_only_token_stops_before_training_in_one_line(tiny_model_dir, tmp_path, hub):
    with pytest.raises(ValueError, match=r"^push_to_hub: the token is not valid \(http://127\.0\.0\.1:\d+\); log in"):
        train(tiny_config(tiny_model_dir, tmp_path / "run", push_to_hub=True, hub_token="hf_wrong"))
    with pytest.raises(ValueError, match=r"^push_to_hub: the token is read-only; make one with write access"):
        train(tiny_config(tiny_model_dir, tmp_path / "run", push_to_hub=True, hub_token="hf_read_token"))
    assert not (tmp_path / "run").exists() and FakeHub.commits == [] and FakeHub.created == []

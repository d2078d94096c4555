"""`amed serve`'s response shapes of the OpenAI endpoints: stream chunks and whole answers."""

from __future__ import annotations

import time
import uuid


class ChatChunks:
    """Response shapes of /v1/chat/completions."""
    ID_PREFIX, CHUNK_OBJECT = "chatcmpl", "chat.completion.chunk"

    def __init__(self, model: str, include_usage: bool = False):
        self.model, self.include_usage = model, include_usage
        self.id = f"{self.ID_PREFIX}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())

    def _chunk(self, choices) -> dict:
        c = {"id": self.id, "object": self.CHUNK_OBJECT, "created": self.created, "model": self.model,
             "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            c["usage"] = None
        return c

    def opening(self) -> list[dict]:
        return [self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}])]

    def delta(self, text: str) -> dict:
        return self._chunk([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])

    def final(self, done: dict) -> dict:
        c = self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": done["finish_reason"]}])
        c["timings"] = done["timings"]          # llama-server's extension: the chat page's speed line
        return c

    def usage(self, done: dict) -> dict:
        c = self._chunk([])
        c["usage"] = done["usage"]
        return c

    def whole(self, text: str, done: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": done["finish_reason"]}],
                "usage": done["usage"], "timings": done["timings"]}


class TextChunks(ChatChunks):
    """Response shapes of /v1/completions."""
    ID_PREFIX, CHUNK_OBJECT = "cmpl", "text_completion"

    def opening(self) -> list[dict]:
        return []

    def delta(self, text: str) -> dict:
        return self._chunk([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}])

    def final(self, done: dict) -> dict:
        c = self._chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": done["finish_reason"]}])
        c["timings"] = done["timings"]
        return c

    def whole(self, text: str, done: dict) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": None,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": done["finish_reason"]}],
                "usage": done["usage"], "timings": done["timings"]}


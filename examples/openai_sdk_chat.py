"""A three-turn conversation through agent-state-proxy with the official OpenAI SDK.

Start the proxy first (`agent-state-proxy serve`), then: `python examples/openai_sdk_chat.py`.
The only change an existing agent needs is the base URL (and a session id, if it wants to
name its session rather than let the proxy infer one).
"""

import os
import sys

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8765/v1"),
    api_key=os.environ.get("OPENAI_API_KEY", "local"),  # the default tenant needs no proxy key
)
model = os.environ.get("MODEL", "gpt-4o-mini")
session = {"X-Session-ID": sys.argv[1] if len(sys.argv) > 1 else "example-session"}

history = [{"role": "system", "content": "You are a terse assistant."}]
for question in ["My name is Ada and I like graph theory.", "What's a good first book for me?"]:
    history.append({"role": "user", "content": question})
    reply = client.chat.completions.with_raw_response.create(model=model, messages=history, extra_headers=session)
    message = reply.parse().choices[0].message
    history.append({"role": "assistant", "content": message.content})
    print(f"[session {reply.headers['x-session-id']}] {message.content}")

# Simulate an agent restart: send only the new question. The proxy restores the rest.
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Remind me: what is my name?"}],
    extra_headers=session,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()

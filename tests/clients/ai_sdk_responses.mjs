// The Vercel AI SDK's OpenAI provider (Responses API by default) against the proxy.
// Run by tests/test_responses_ai_sdk.py: node ai_sdk_responses.mjs, with ASP_BASE_URL set.
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, jsonSchema, stepCountIs, streamText, tool } from "ai";

const openai = createOpenAI({ baseURL: process.env.ASP_BASE_URL, apiKey: "local-key", headers: { "X-Session-ID": "ai-sdk" } });
const getWeather = tool({
  description: "The weather of a city",
  inputSchema: jsonSchema({ type: "object", properties: { city: { type: "string" } }, required: ["city"], additionalProperties: false }),
  execute: async ({ city }) => `sunny in ${city}`,
});

const first = await generateText({
  model: openai("fake-model"),
  system: "You answer weather questions.",
  prompt: "What is the weather in Oslo?",
  tools: { get_weather: getWeather },
  stopWhen: stepCountIs(3),
});
const second = streamText({
  model: openai("fake-model"),
  prompt: "And tomorrow?",
  providerOptions: { openai: { previousResponseId: first.response.id } },
});
let streamed = "";
for await (const piece of second.textStream) streamed += piece;
console.log(JSON.stringify({ first: first.text, steps: first.steps.length, firstId: first.response.id, second: streamed }));

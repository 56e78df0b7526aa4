// The official OpenAI JS SDK's helpers against the gateway: zodResponseFormat (chat.completions.parse)
// and runTools (a named function, which the runner calls once). Env: OPENAI_BASE_URL, MODEL.
// Run by tests/integration/test_openai_structured.py; prints "<helper> ok" per helper, exits 1 on failure.
import assert from "node:assert/strict";
import OpenAI from "openai";
import { zodResponseFormat } from "openai/helpers/zod";
import { z } from "zod";

const client = new OpenAI({ baseURL: process.env.OPENAI_BASE_URL, apiKey: "not-needed", maxRetries: 0 });
const model = process.env.MODEL;

const City = z.object({ name: z.string(), country: z.string(), population: z.number().int() });
const parsed = await client.chat.completions.parse({
  model,
  messages: [{ role: "user", content: "Describe Paris as JSON." }],
  response_format: zodResponseFormat(City, "city"),
  temperature: 0,
  max_tokens: 80,
});
const city = parsed.choices[0].message.parsed;
assert.ok(City.parse(city).name.length > 0);
console.log("zodResponseFormat ok", JSON.stringify(city));

const calls = [];
const runner = client.chat.completions.runTools({
  model,
  messages: [{ role: "user", content: "What is the weather in Paris?" }],
  tools: [
    {
      type: "function",
      function: {
        name: "get_weather",
        description: "The current weather in a city",
        parameters: {
          type: "object",
          properties: { city: { type: "string" } },
          required: ["city"],
          additionalProperties: false,
        },
        parse: JSON.parse,
        function: (args) => {
          calls.push(args);
          return { temperature: 21, sky: "clear" };
        },
      },
    },
  ],
  tool_choice: { type: "function", function: { name: "get_weather" } },
  temperature: 0,
  max_tokens: 60,
});
await runner.finalChatCompletion();
assert.equal(calls.length, 1);
assert.equal(typeof calls[0].city, "string");
const toolMessages = runner.messages.filter((message) => message.role === "tool");
assert.equal(toolMessages.length, 1);
console.log("runTools ok", JSON.stringify(calls));

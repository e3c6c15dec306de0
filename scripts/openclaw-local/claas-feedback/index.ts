// claas-feedback: an OpenClaw plugin that registers `/feedback <text>`.
//
// It remembers the last turn that CLaaS answered in each conversation (per sender within it): the user's prompt,
// the full messages OpenClaw built (system prompt, history), the answer text and the id of the upstream
// completion (`responseId` of the assistant message, the `chatcmpl-...` id CLaaS served). `/feedback <text>` posts
// that turn with the feedback to CLaaS's `POST /v1/feedback`, with `completion_id`, so CLaaS trains on exactly the
// tokens it served (`sources: ["cache"]`). When CLaaS no longer has the completion (restart, expiry: 404 on
// completion_id) it sends the full messages instead, so the step still sees OpenClaw's system prompt and history.
// With `batchSize` N > 1, feedback is queued and sent as one training step of N items.
//
// Facts from OpenClaw 2026.9.6's plugin SDK (node_modules/openclaw/dist/plugin-entry-*.d.ts): `llm_input` carries
// systemPrompt / prompt / historyMessages, `llm_output` carries assistantTexts / lastAssistant; both need
// `plugins.entries.claas-feedback.hooks.allowConversationAccess: true`. Command handlers get `args`, `sessionKey`,
// `senderId` and return a reply payload `{ text }`.
import { definePluginEntry } from "openclaw/plugin-sdk/plugin-entry";

type ChatMessage = { role: string; content: string };

type Turn = {
  loraId: string;
  prompt: string; // the run's prompt as OpenClaw gave it to the model (the user's words, maybe with a timestamp)
  messages: ChatMessage[]; // system prompt + history + this prompt
  response: string; // the answer text the model produced
  completionId?: string; // CLaaS's completion id
};

type FeedbackItem = {
  lora_id: string;
  prompt: string | ChatMessage[];
  response: string;
  feedback: string;
  completion_id?: string;
  training?: Record<string, unknown>;
};

type PluginConfig = {
  claasUrl: string;
  apiKey?: string;
  provider: string;
  batchSize: number;
  timeoutMs: number;
  training?: Record<string, unknown>; // CLaaS TrainingConfig overrides sent with every item (e.g. learning_rate)
};

type Pending = { prompt: string; messages: ChatMessage[] };

function readConfig(raw: unknown): PluginConfig {
  const cfg = (raw ?? {}) as Record<string, unknown>;
  const url = typeof cfg.claasUrl === "string" && cfg.claasUrl ? cfg.claasUrl : "http://127.0.0.1:8080";
  return {
    claasUrl: url.replace(/\/+$/, "").replace(/\/v1$/, ""),
    apiKey: typeof cfg.apiKey === "string" && cfg.apiKey && !cfg.apiKey.startsWith("${") ? cfg.apiKey : undefined,
    provider: typeof cfg.provider === "string" && cfg.provider ? cfg.provider : "claas",
    batchSize: typeof cfg.batchSize === "number" && cfg.batchSize >= 1 ? Math.floor(cfg.batchSize) : 1,
    timeoutMs: typeof cfg.timeoutMs === "number" && cfg.timeoutMs >= 1000 ? cfg.timeoutMs : 600_000,
    training:
      cfg.training && typeof cfg.training === "object" ? (cfg.training as Record<string, unknown>) : undefined,
  };
}

// OpenClaw's internal messages have content as a string or an array of parts; keep the text parts.
function textOf(content: unknown): string {
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) return "";
  return content
    .filter((part) => part && typeof part === "object" && (part as { type?: unknown }).type === "text")
    .map((part) => String((part as { text?: unknown }).text ?? ""))
    .join("\n");
}

function toChatMessages(systemPrompt: string | undefined, history: unknown[], prompt: string): ChatMessage[] {
  const messages: ChatMessage[] = [];
  if (systemPrompt) messages.push({ role: "system", content: systemPrompt });
  for (const entry of history) {
    const message = entry as { role?: unknown; content?: unknown };
    if (message.role !== "user" && message.role !== "assistant") continue;
    const content = textOf(message.content);
    if (content) messages.push({ role: message.role, content });
  }
  messages.push({ role: "user", content: prompt });
  return messages;
}

function turnKeys(sessionKey?: string, senderId?: string): string[] {
  const keys: string[] = [];
  if (sessionKey && senderId) keys.push(`${sessionKey}|${senderId}`);
  if (sessionKey) keys.push(sessionKey);
  else if (senderId) keys.push(`sender:${senderId}`);
  return keys;
}

// No parameter properties: the file stays plain erasable TypeScript (runs under Node's type stripping too).
class ClaasError extends Error {
  readonly status: number;
  readonly param?: string;

  constructor(message: string, status: number, param?: string) {
    super(message);
    this.status = status;
    this.param = param;
  }
}

async function postFeedback(cfg: PluginConfig, items: FeedbackItem[]): Promise<Record<string, unknown>> {
  const body = items.length === 1 ? items[0] : { requests: items };
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (cfg.apiKey) headers.authorization = `Bearer ${cfg.apiKey}`;
  let response: Response;
  try {
    response = await fetch(`${cfg.claasUrl}/v1/feedback`, {
      method: "POST",
      headers,
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(cfg.timeoutMs),
    });
  } catch (error) {
    throw new ClaasError(`CLaaS at ${cfg.claasUrl} is unreachable (${(error as Error).message})`, 0);
  }
  const text = await response.text();
  let data: Record<string, unknown> = {};
  try {
    data = text ? (JSON.parse(text) as Record<string, unknown>) : {};
  } catch {
    data = {};
  }
  if (!response.ok) {
    const error = (data.error ?? {}) as { message?: string; param?: string };
    throw new ClaasError(error.message ?? (text.slice(0, 300) || response.statusText), response.status, error.param);
  }
  return data;
}

// Send; when CLaaS has forgotten a completion, send the full messages instead (trained on the text as sent).
async function sendWithFallback(
  cfg: PluginConfig,
  items: FeedbackItem[],
  turns: Turn[],
): Promise<Record<string, unknown>> {
  try {
    return await postFeedback(cfg, items);
  } catch (error) {
    if (!(error instanceof ClaasError) || error.status !== 404 || !String(error.param ?? "").includes("completion_id")) {
      throw error;
    }
    const fallback = items.map((item, index) => ({
      lora_id: item.lora_id,
      prompt: turns[index].messages,
      response: item.response,
      feedback: item.feedback,
      ...(item.training ? { training: item.training } : {}),
    }));
    return await postFeedback(cfg, fallback);
  }
}

function describeResult(data: Record<string, unknown>, queued: number): string {
  const result = (data.distill_result ?? {}) as { step?: number; metrics?: Record<string, number>; lora_id?: string };
  const timing = (data.timing_ms ?? {}) as Record<string, number>;
  const loss = result.metrics?.loss;
  const seconds = typeof timing.total === "number" ? (timing.total / 1000).toFixed(1) : "?";
  const sources = Array.isArray(data.sources) ? (data.sources as string[]).join(", ") : "?";
  const lossText = typeof loss === "number" ? loss.toFixed(4) : "n/a";
  return (
    `Trained ${result.lora_id ?? data.lora_id ?? "?"} on ${queued} feedback item${queued === 1 ? "" : "s"}: ` +
    `step ${result.step ?? "?"}, loss ${lossText}, ${seconds} s (tokens from: ${sources}).`
  );
}

type State = {
  pending: Map<string, Pending>; // runId -> what the model was given
  turns: Map<string, Turn>; // conversation (and sender) -> last answered turn
  queues: Map<string, { items: FeedbackItem[]; turns: Turn[] }>; // batching
};

// OpenClaw registers a plugin more than once in one gateway process (the hook runner and the command registry
// can hold different instances, and a config reload registers again), so the state lives on the process, not on
// one registration.
function sharedState(): State {
  const holder = globalThis as typeof globalThis & { __claasFeedbackState?: State };
  holder.__claasFeedbackState ??= { pending: new Map(), turns: new Map(), queues: new Map() };
  return holder.__claasFeedbackState;
}

export default definePluginEntry({
  id: "claas-feedback",
  name: "CLaaS feedback",
  description: "/feedback <text> trains the CLaaS adapter that gave the last answer in this chat.",
  register(api) {
    const cfg = readConfig(api.pluginConfig);
    const { pending, turns, queues } = sharedState();

    api.on("llm_input", (event, ctx) => {
      if (event.provider !== cfg.provider) return;
      const prompt = event.prompt ?? "";
      pending.set(event.runId, {
        prompt,
        messages: toChatMessages(event.systemPrompt, event.historyMessages ?? [], prompt),
      });
      if (pending.size > 256) pending.delete(pending.keys().next().value as string);
      void ctx;
    });

    api.on("llm_output", (event, ctx) => {
      if (event.provider !== cfg.provider) return;
      const input = pending.get(event.runId);
      pending.delete(event.runId);
      const last = (event.lastAssistant ?? {}) as { content?: unknown; responseId?: unknown; stopReason?: unknown };
      if (last.stopReason === "aborted" || last.stopReason === "error") return;
      const response = textOf(last.content) || (event.assistantTexts ?? []).join("\n");
      if (!input || !response.trim()) {
        api.logger.debug?.(`claas-feedback: turn ${event.runId} not kept (${response.length} chars)`);
        return;
      }
      const turn: Turn = {
        loraId: event.model,
        prompt: input.prompt,
        messages: input.messages,
        response,
        completionId: typeof last.responseId === "string" ? last.responseId : undefined,
      };
      const keys = turnKeys(ctx.sessionKey, ctx.senderId);
      for (const key of keys) turns.set(key, turn);
      api.logger.debug?.(`claas-feedback: last turn of ${keys.join(", ")} kept (${turn.loraId}, ${turn.completionId})`);
    });

    api.registerCommand({
      name: "feedback",
      description: "Give feedback on the last answer; CLaaS trains the adapter on it.",
      acceptsArgs: true,
      handler: async (ctx) => {
        const feedback = (ctx.args ?? "").trim();
        if (!feedback) return { text: "Usage: /feedback <what to do better>" };
        const turn = turnKeys(ctx.sessionKey, ctx.senderId)
          .map((key) => turns.get(key))
          .find((found) => found !== undefined);
        if (!turn) return { text: "No answer from CLaaS in this chat yet: ask something first, then /feedback." };
        const item: FeedbackItem = {
          lora_id: turn.loraId,
          prompt: turn.prompt,
          response: turn.response,
          feedback,
          ...(turn.completionId ? { completion_id: turn.completionId } : {}),
          ...(cfg.training ? { training: cfg.training } : {}),
        };
        const queueKey = `${turn.loraId}|${turnKeys(ctx.sessionKey, ctx.senderId)[0] ?? ""}`;
        const queue = queues.get(queueKey) ?? { items: [], turns: [] };
        queue.items.push(item);
        queue.turns.push(turn);
        if (queue.items.length < cfg.batchSize) {
          queues.set(queueKey, queue);
          return { text: `Feedback queued (${queue.items.length}/${cfg.batchSize}); training after ${cfg.batchSize}.` };
        }
        queues.delete(queueKey);
        try {
          const data = await sendWithFallback(cfg, queue.items, queue.turns);
          const text = describeResult(data, queue.items.length);
          api.logger.info(`claas-feedback: ${text}`);
          return { text };
        } catch (error) {
          const status = error instanceof ClaasError && error.status ? ` (HTTP ${error.status})` : "";
          return { text: `Feedback not applied${status}: ${(error as Error).message}` };
        }
      },
    });
  },
});

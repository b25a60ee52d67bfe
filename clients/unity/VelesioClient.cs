// Velesio AI Server client for Unity projects that do not use the "LLM for Unity" asset (docs/unity.md).
// UnityWebRequest + JsonUtility only; Unity 2020.2 or later. Drop this file into Assets/, add the component to a
// GameObject, set Base Url and Api Key in the Inspector, then for example:
//
//     var velesio = GetComponent<Velesio.VelesioClient>();
//     velesio.Complete("Q: What is the capital of France?\nA:", new Velesio.CompletionOptions { max_tokens = 32 },
//                      text => Debug.Log(text), err => Debug.LogError(err));
//     velesio.StreamComplete("Once upon a time", null, piece => label.text += piece, full => Debug.Log("done"),
//                            err => Debug.LogError(err));
//     velesio.Txt2Img(new Velesio.Txt2ImgRequest { prompt = "a lighthouse", width = 512, height = 512 },
//                     textures => rawImage.texture = textures[0], err => Debug.LogError(err));
//
// Every method returns the Coroutine it started; callbacks run on the main thread.

using System;
using System.Collections;
using System.Collections.Generic;
using System.Text;
using UnityEngine;
using UnityEngine.Networking;

namespace Velesio
{
    /// <summary>Fields of POST /completion in the API's own shape (answers come as choices[0].text).
    /// Only fields of that shape are listed: a llama.cpp-only field such as n_predict would switch the answer
    /// to llama.cpp's shape.</summary>
    [Serializable]
    public class CompletionOptions
    {
        public int max_tokens = 150;
        public float temperature = 0.7f;
        public float top_p = 0.9f;
        public int top_k = 40;
        public float frequency_penalty = 0f;
        public float presence_penalty = 0f;
        public string[] stop = new string[0];
        public long seed = -1;          // -1: random
        public string model = "";       // "": the router's default text model
    }

    [Serializable]
    class CompletionRequest
    {
        public string prompt;
        public int max_tokens;
        public float temperature;
        public float top_p;
        public int top_k;
        public float frequency_penalty;
        public float presence_penalty;
        public string[] stop;
        public long seed;
        public string model;
        public bool stream;

        public CompletionRequest(string prompt, CompletionOptions o, bool stream)
        {
            o = o ?? new CompletionOptions();
            this.prompt = prompt;
            max_tokens = o.max_tokens;
            temperature = o.temperature;
            top_p = o.top_p;
            top_k = o.top_k;
            frequency_penalty = o.frequency_penalty;
            presence_penalty = o.presence_penalty;
            stop = o.stop ?? new string[0];
            seed = o.seed;
            model = o.model ?? "";
            this.stream = stream;
        }
    }

#pragma warning disable 0649  // filled in by JsonUtility
    [Serializable] class Choice { public string text; public string finish_reason; }
    [Serializable] class ErrorBody { public string code; public string message; }
    [Serializable] class CompletionResponse { public Choice[] choices; public ErrorBody error; }

    /// <summary>POST /sdapi/v1/txt2img (AUTOMATIC1111's fields; the defaults are the API reference's).</summary>
    [Serializable]
    public class Txt2ImgRequest
    {
        public string prompt = "";
        public string negative_prompt = "";
        public int width = 512;
        public int height = 512;
        public int steps = 20;
        public float cfg_scale = 7.5f;
        public string sampler_name = "Euler a";
        public long seed = -1;
        public int batch_size = 1;
        public int n_iter = 1;
    }

    [Serializable] class Txt2ImgResponse { public string[] images; public string info; }
#pragma warning restore 0649

    /// <summary>An error answer: HTTP status (0 when the server could not be reached), the API's code
    /// (unauthorized, invalid_request, model_not_found, rate_limited, queue_full, ...) and its message.</summary>
    public class VelesioException : Exception
    {
        public readonly long Status;
        public readonly string Code;

        public VelesioException(long status, string code, string message) : base($"{status} {code}: {message}")
        {
            Status = status;
            Code = code;
        }

        public static VelesioException From(UnityWebRequest request, string body)
        {
            ErrorBody error = null;
            try
            {
                error = JsonUtility.FromJson<CompletionResponse>(body ?? "")?.error;
            }
            catch (Exception) { /* not JSON */ }
            string code = !string.IsNullOrEmpty(error?.code) ? error.code
                : request.responseCode == 0 ? "connection_error" : "http_" + request.responseCode;
            string message = !string.IsNullOrEmpty(error?.message) ? error.message : (request.error ?? body);
            return new VelesioException(request.responseCode, code, message);
        }
    }

    /// <summary>Reads an SSE answer as it arrives: one "data: {...}" line per event, "data: [DONE]" at the end.
    /// Anything that is not an event (an error answer's JSON body) is kept in <see cref="Raw"/>.</summary>
    public class SseDownloadHandler : DownloadHandlerScript
    {
        readonly Action<string> onPiece;
        readonly Decoder decoder = Encoding.UTF8.GetDecoder();
        readonly StringBuilder line = new StringBuilder();
        public readonly StringBuilder Text = new StringBuilder();
        public readonly StringBuilder Raw = new StringBuilder();
        public VelesioException StreamError;
        public bool Done;

        public SseDownloadHandler(Action<string> onPiece) : base(new byte[4096])
        {
            this.onPiece = onPiece;
        }

        protected override bool ReceiveData(byte[] data, int dataLength)
        {
            if (data == null || dataLength == 0) return true;
            char[] chars = new char[decoder.GetCharCount(data, 0, dataLength)];
            decoder.GetChars(data, 0, dataLength, chars, 0);  // keeps a UTF-8 sequence split across chunks
            foreach (char c in chars)
            {
                if (c != '\n') { line.Append(c); continue; }
                HandleLine(line.ToString().TrimEnd('\r'));
                line.Clear();
            }
            return true;
        }

        protected override void CompleteContent()
        {
            if (line.Length > 0) HandleLine(line.ToString());
            line.Clear();
        }

        void HandleLine(string text)
        {
            if (!text.StartsWith("data:"))
            {
                if (text.Length > 0) Raw.Append(text).Append('\n');
                return;
            }
            string json = text.Substring(5).Trim();
            if (json == "[DONE]") { Done = true; return; }
            if (Done || StreamError != null) return;
            CompletionResponse evt = JsonUtility.FromJson<CompletionResponse>(json);
            if (!string.IsNullOrEmpty(evt.error?.message))
            {
                // an error after the stream started (the status line said 200)
                StreamError = new VelesioException(0, evt.error.code, evt.error.message);
                return;
            }
            if (evt.choices == null || evt.choices.Length == 0) return;
            string piece = evt.choices[0].text;
            if (string.IsNullOrEmpty(piece)) return;
            Text.Append(piece);
            onPiece?.Invoke(piece);
        }
    }

    public class VelesioClient : MonoBehaviour
    {
        [Tooltip("Router address with scheme and port, e.g. http://your-server:8000")]
        public string baseUrl = "http://localhost:8000";
        [Tooltip("API token (sent as Authorization: Bearer)")]
        public string apiKey = "";
        [Tooltip("Seconds a request may take (0: no limit)")]
        public int timeout = 120;
        [Tooltip("Retries after a 429 or 503 answer, waiting its Retry-After")]
        public int maxRetries = 2;
        [Tooltip("Longest wait between retries, in seconds")]
        public float maxRetryWait = 30f;

        /// <summary>Non-streamed completion; onDone gets choices[0].text.</summary>
        public Coroutine Complete(string prompt, CompletionOptions options, Action<string> onDone,
                                  Action<VelesioException> onError = null)
        {
            string body = JsonUtility.ToJson(new CompletionRequest(prompt, options, false));
            return StartCoroutine(Send("/completion", body, () => new DownloadHandlerBuffer(), request =>
            {
                CompletionResponse response = JsonUtility.FromJson<CompletionResponse>(request.downloadHandler.text);
                onDone?.Invoke(response.choices != null && response.choices.Length > 0 ? response.choices[0].text : "");
            }, onError));
        }

        /// <summary>Streamed completion; onPiece gets each text piece as it is generated, onDone the whole text.
        /// Stop it early with StopCoroutine on the returned Coroutine.</summary>
        public Coroutine StreamComplete(string prompt, CompletionOptions options, Action<string> onPiece,
                                        Action<string> onDone = null, Action<VelesioException> onError = null)
        {
            string body = JsonUtility.ToJson(new CompletionRequest(prompt, options, true));
            SseDownloadHandler handler = null;
            return StartCoroutine(Send("/completion", body, () => handler = new SseDownloadHandler(onPiece), request =>
            {
                if (handler.StreamError != null) onError?.Invoke(handler.StreamError);
                else onDone?.Invoke(handler.Text.ToString());
            }, onError, stream: true));
        }

        /// <summary>Text to image; onDone gets one Texture2D per image (the API sends base64 PNG).</summary>
        public Coroutine Txt2Img(Txt2ImgRequest txt2img, Action<Texture2D[]> onDone,
                                 Action<VelesioException> onError = null)
        {
            string body = JsonUtility.ToJson(txt2img);
            return StartCoroutine(Send("/sdapi/v1/txt2img", body, () => new DownloadHandlerBuffer(), request =>
            {
                Txt2ImgResponse response = JsonUtility.FromJson<Txt2ImgResponse>(request.downloadHandler.text);
                var textures = new List<Texture2D>();
                foreach (string b64 in response.images ?? new string[0])
                {
                    var texture = new Texture2D(2, 2);  // LoadImage resizes it
                    texture.LoadImage(Convert.FromBase64String(b64));
                    textures.Add(texture);
                }
                onDone?.Invoke(textures.ToArray());
            }, onError));
        }

        IEnumerator Send(string path, string json, Func<DownloadHandler> makeHandler, Action<UnityWebRequest> onSuccess,
                         Action<VelesioException> onError, bool stream = false)
        {
            byte[] payload = Encoding.UTF8.GetBytes(json);
            for (int attempt = 0; ; attempt++)
            {
                using (var request = new UnityWebRequest(baseUrl.TrimEnd('/') + path, "POST"))
                {
                    request.uploadHandler = new UploadHandlerRaw(payload);
                    request.downloadHandler = makeHandler();
                    request.timeout = timeout;
                    request.SetRequestHeader("Content-Type", "application/json");
                    request.SetRequestHeader("Accept", stream ? "text/event-stream" : "application/json");
                    if (!string.IsNullOrEmpty(apiKey)) request.SetRequestHeader("Authorization", "Bearer " + apiKey);
                    yield return request.SendWebRequest();

                    if (request.result == UnityWebRequest.Result.Success)
                    {
                        onSuccess(request);
                        yield break;
                    }
                    string body = request.downloadHandler is SseDownloadHandler sse
                        ? sse.Raw.ToString() : request.downloadHandler?.text;
                    long status = request.responseCode;
                    if ((status == 429 || status == 503) && attempt < maxRetries)
                    {
                        float wait;
                        if (!float.TryParse(request.GetResponseHeader("Retry-After"),
                                            System.Globalization.NumberStyles.Float,
                                            System.Globalization.CultureInfo.InvariantCulture, out wait))
                            wait = 0.5f * (1 << attempt);
                        yield return new WaitForSecondsRealtime(Mathf.Min(wait, maxRetryWait));
                        continue;
                    }
                    onError?.Invoke(VelesioException.From(request, body));
                    yield break;
                }
            }
        }
    }
}

// model_files.h: tiny valid cpuformer model files built in memory, in the layout cpuformer.save() writes (F32
// tensors under their state-dict names; format, version, model_class and the config as JSON in the metadata).
// Used by the C++ core test and as the seed corpus of the model-file fuzzer; header-only, standard library only.
#pragma once

#include <cstdint>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace cpuformer_testing {

struct TensorSpec {
  std::string name;
  std::vector<std::int64_t> shape;
};

inline std::string json_quote(const std::string& s) {
  std::string out = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

// A safetensors file: the tensors in order, filled with deterministic values in [-0.5, 0.5).
inline std::string safetensors_file(const std::vector<TensorSpec>& tensors,
                                    const std::map<std::string, std::string>& metadata, std::uint32_t seed = 1) {
  std::string header = "{", data;
  for (const auto& t : tensors) {
    std::int64_t n = 1;
    std::string shape;
    for (const auto d : t.shape) n *= d, shape += (shape.empty() ? "" : ",") + std::to_string(d);
    const size_t begin = data.size();
    for (std::int64_t i = 0; i < n; ++i) {
      seed = seed * 1664525u + 1013904223u;
      const float v = static_cast<float>(seed >> 8) / 16777216.0f - 0.5f;
      char bytes[4];
      std::memcpy(bytes, &v, 4);  // little-endian hosts, as the format
      data.append(bytes, 4);
    }
    header += json_quote(t.name) + ":{\"dtype\":\"F32\",\"shape\":[" + shape + "],\"data_offsets\":[" +
              std::to_string(begin) + "," + std::to_string(data.size()) + "]},";
  }
  header += "\"__metadata__\":{";
  for (const auto& [k, v] : metadata) header += json_quote(k) + ":" + json_quote(v) + ",";
  if (!metadata.empty()) header.pop_back();
  header += "}}";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[i] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
  return file + header + data;
}

// A model: its class, its config (JSON text) and its tensors. Tests edit the config or the tensors, then file().
struct ModelSpec {
  std::string model_class, config;
  std::vector<TensorSpec> tensors;
  std::string file(std::uint32_t seed = 1) const {
    return safetensors_file(tensors, {{"format", "cpuformer-model"}, {"version", "1"},
                                      {"model_class", model_class}, {"config", config}}, seed);
  }
};

// The tensors of one nn.TransformerEncoderLayer.
inline void add_layer(std::vector<TensorSpec>* t, const std::string& p, std::int64_t C, std::int64_t F) {
  t->insert(t->end(), {{p + "self_attn.in_proj_weight", {3 * C, C}}, {p + "self_attn.in_proj_bias", {3 * C}},
                       {p + "self_attn.out_proj.weight", {C, C}}, {p + "self_attn.out_proj.bias", {C}},
                       {p + "linear1.weight", {F, C}}, {p + "linear1.bias", {F}},
                       {p + "linear2.weight", {C, F}}, {p + "linear2.bias", {C}},
                       {p + "norm1.weight", {C}}, {p + "norm1.bias", {C}},
                       {p + "norm2.weight", {C}}, {p + "norm2.bias", {C}}});
}

// GPT(vocab 11, block_size 6, 2 layers, 2 heads, n_embd 8).
inline ModelSpec tiny_gpt(bool learned = true, bool tied = true) {
  const std::int64_t V = 11, T = 6, C = 8, layers = 2;
  ModelSpec m{"GPT",
              "{\"vocab_size\": 11, \"block_size\": 6, \"n_layer\": 2, \"n_head\": 2, \"n_embd\": 8, "
              "\"dropout\": 0.0, \"positional\": \"" + std::string(learned ? "learned" : "sinusoidal") +
                  "\", \"tie_weights\": " + (tied ? "true" : "false") +
                  ", \"activation\": \"gelu\", \"layer_norm_eps\": 1e-05}",
              {{"wte.weight", {V, C}}}};
  if (learned) m.tensors.push_back({"wpe.weight", {T, C}});
  for (std::int64_t i = 0; i < layers; ++i) add_layer(&m.tensors, "blocks." + std::to_string(i) + ".", C, 4 * C);
  m.tensors.insert(m.tensors.end(), {{"ln_f.weight", {C}}, {"ln_f.bias", {C}}});
  if (!tied) m.tensors.push_back({"lm_head.weight", {V, C}});
  return m;
}

// TransformerClassifier(vocab 13, 3 classes, d_model 8, 2 heads, 2 layers, dim_feedforward 12, max_len 5).
inline ModelSpec tiny_classifier(bool mean_pool = true, bool learned = false) {
  const std::int64_t V = 13, C = 8, F = 12, max_len = 5;
  ModelSpec m{"TransformerClassifier",
              "{\"vocab_size\": 13, \"num_classes\": 3, \"d_model\": 8, \"nhead\": 2, \"num_layers\": 2, "
              "\"dim_feedforward\": 12, \"dropout\": 0.1, \"max_len\": 5, \"pooling\": \"" +
                  std::string(mean_pool ? "mean" : "cls") + "\", \"pad_id\": 0, \"positional\": \"" +
                  (learned ? "learned" : "sinusoidal") + "\", \"norm_first\": true}",
              {{"embedding.weight", {V, C}}}};
  if (!mean_pool) m.tensors.push_back({"cls", {C}});
  if (learned) m.tensors.push_back({"pos.weight", {max_len + 1, C}});
  for (int i = 0; i < 2; ++i) add_layer(&m.tensors, "encoder.layers." + std::to_string(i) + ".", C, F);
  m.tensors.insert(m.tensors.end(), {{"encoder.norm.weight", {C}}, {"encoder.norm.bias", {C}},
                                     {"head.weight", {3, C}}, {"head.bias", {3}}});
  return m;
}

// BertModel(vocab 17, hidden 8, 2 layers, 2 heads, intermediate 10, 6 positions, 2 token types).
inline ModelSpec tiny_bert() {
  const std::int64_t V = 17, C = 8, F = 10;
  ModelSpec m{"BertModel",
              "{\"vocab_size\": 17, \"hidden_size\": 8, \"num_hidden_layers\": 2, \"num_attention_heads\": 2, "
              "\"intermediate_size\": 10, \"max_position_embeddings\": 6, \"type_vocab_size\": 2, "
              "\"layer_norm_eps\": 1e-12, \"hidden_act\": \"gelu\", \"pooler\": true}",
              {{"word_embeddings.weight", {V, C}}, {"position_embeddings.weight", {6, C}},
               {"token_type_embeddings.weight", {2, C}}, {"embeddings_norm.weight", {C}},
               {"embeddings_norm.bias", {C}}}};
  for (int i = 0; i < 2; ++i) add_layer(&m.tensors, "layers." + std::to_string(i) + ".", C, F);
  m.tensors.insert(m.tensors.end(), {{"pooler.weight", {C, C}}, {"pooler.bias", {C}}});
  return m;
}

// A Llama-style GPT: RMSNorm, rotary, gated SiLU, grouped-query attention (1 key/value head of 2), no biases,
// an untied head (vocab 11, block_size 6, 2 layers, n_embd 8, d_ff 12).
inline ModelSpec tiny_llama_gpt() {
  const std::int64_t V = 11, C = 8, F = 12, KV = 4;
  ModelSpec m{"GPT",
              "{\"vocab_size\": 11, \"block_size\": 6, \"n_layer\": 2, \"n_head\": 2, \"n_embd\": 8, "
              "\"dropout\": 0.0, \"positional\": \"rotary\", \"tie_weights\": false, \"activation\": \"silu\", "
              "\"layer_norm_eps\": 1e-05, \"norm\": \"rms_norm\", \"n_kv_head\": 1, \"gated\": true, "
              "\"bias\": false, \"d_ff\": 12, \"rope_theta\": 10000.0}",
              {{"wte.weight", {V, C}}}};
  for (int i = 0; i < 2; ++i) {
    const std::string p = "blocks." + std::to_string(i) + ".";
    m.tensors.insert(m.tensors.end(), {{p + "self_attn.q_proj.weight", {C, C}}, {p + "self_attn.k_proj.weight", {KV, C}},
                                       {p + "self_attn.v_proj.weight", {KV, C}}, {p + "self_attn.o_proj.weight", {C, C}},
                                       {p + "mlp.gate_proj.weight", {F, C}}, {p + "mlp.up_proj.weight", {F, C}},
                                       {p + "mlp.down_proj.weight", {C, F}}, {p + "input_layernorm.weight", {C}},
                                       {p + "post_attention_layernorm.weight", {C}}});
  }
  m.tensors.insert(m.tensors.end(), {{"ln_f.weight", {C}}, {"lm_head.weight", {V, C}}});
  return m;
}

// Seq2SeqTransformer(source vocab 13, target vocab 11, d_model 8, 2 heads, 1 + 1 layers, dim_feedforward 12,
// max_len 8, pad 0, bos 1, eos 2).
inline ModelSpec tiny_seq2seq() {
  const std::int64_t C = 8, F = 12;
  ModelSpec m{"Seq2SeqTransformer",
              "{\"src_vocab_size\": 13, \"tgt_vocab_size\": 11, \"d_model\": 8, \"nhead\": 2, "
              "\"num_encoder_layers\": 1, \"num_decoder_layers\": 1, \"dim_feedforward\": 12, \"dropout\": 0.0, "
              "\"max_len\": 8, \"pad_id\": 0, \"bos_id\": 1, \"eos_id\": 2, \"norm_first\": true}",
              {{"src_embedding.weight", {13, C}}, {"tgt_embedding.weight", {11, C}}}};
  add_layer(&m.tensors, "transformer.encoder.layers.0.", C, F);
  const std::string d = "transformer.decoder.layers.0.";
  add_layer(&m.tensors, d, C, F);
  m.tensors.insert(m.tensors.end(), {{d + "multihead_attn.in_proj_weight", {3 * C, C}},
                                     {d + "multihead_attn.in_proj_bias", {3 * C}},
                                     {d + "multihead_attn.out_proj.weight", {C, C}},
                                     {d + "multihead_attn.out_proj.bias", {C}}, {d + "norm3.weight", {C}},
                                     {d + "norm3.bias", {C}}, {"transformer.encoder.norm.weight", {C}},
                                     {"transformer.encoder.norm.bias", {C}}, {"transformer.decoder.norm.weight", {C}},
                                     {"transformer.decoder.norm.bias", {C}}, {"generator.weight", {11, C}},
                                     {"generator.bias", {11}}});
  return m;
}

// Every variant, named (the fuzzer's seeds).
inline std::vector<std::pair<std::string, ModelSpec>> tiny_models() {
  return {{"gpt_learned_tied", tiny_gpt(true, true)},     {"gpt_sinusoidal_untied", tiny_gpt(false, false)},
          {"clf_mean_sinusoidal", tiny_classifier(true, false)}, {"clf_cls_learned", tiny_classifier(false, true)},
          {"bert", tiny_bert()}, {"gpt_llama", tiny_llama_gpt()}, {"seq2seq", tiny_seq2seq()}};
}

}  // namespace cpuformer_testing

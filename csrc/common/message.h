// Error messages built as plain strings, and the check macros that use them.
//
// Every check in csrc/ is SURGELLM_CHECK / _VALUE / _TYPE, never TORCH_CHECK
// with numbers among its arguments: TORCH_CHECK formats its arguments with a
// std::ostringstream constructed in this library, and where the build links
// parts of libstdc++ into it (seen with a source-built torch on a GPU
// machine) that stream's locale comes from the library's copy while the
// number formatting runs in the process's libstdc++ -- the facets disagree and
// the first message with a number crashed the process. Here numbers become
// text with std::to_string / std::to_chars, and objects through their own
// str(), so no stream of this library ever formats a number; the message
// reaches TORCH_CHECK as one string. Like TORCH_CHECK's own arguments, the
// message is only built when the check fails.
#pragma once

#include <ATen/ATen.h>

#include <charconv>
#include <string>
#include <type_traits>
#include <vector>

namespace surgellm {

// repr(float): the shortest text that reads back as v (1e-05, 1.5, -1.0).
inline std::string number_text(double v) {
  char buf[64];
  const auto end = std::to_chars(buf, buf + sizeof(buf), v).ptr;
  std::string text(buf, end);
  if (text.find_first_of(".en") == std::string::npos) text += ".0";  // "inf", "nan" have n
  return text;
}

inline std::string int_text(const c10::SymInt& v) {
  if (auto i = v.maybe_as_int()) return std::to_string(*i);
  return v.toSymNode()->str();  // a symbolic size while tracing: its name, s0
}

// tuple(t.shape): (4,), (6, 4), ().
inline std::string shape_text(c10::SymIntArrayRef shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + int_text(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

namespace detail {

inline void append(std::string& out, const char* v) { out += v; }
inline void append(std::string& out, const std::string& v) { out += v; }
inline void append(std::string& out, c10::string_view v) { out.append(v.data(), v.size()); }
inline void append(std::string& out, char v) { out += v; }
inline void append(std::string& out, double v) { out += number_text(v); }
inline void append(std::string& out, const c10::SymInt& v) { out += int_text(v); }
inline void append(std::string& out, const c10::Device& v) { out += v.str(); }
inline void append(std::string& out, at::ScalarType v) { out += c10::toString(v); }
// [2, 3], as c10 prints an ArrayRef
inline void append(std::string& out, c10::IntArrayRef v) {
  out += "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + std::to_string(v[i]);
  out += "]";
}
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool> &&
                                           !std::is_same_v<T, char>,
                                       int> = 0>
inline void append(std::string& out, T v) {
  out += std::to_string(v);
}

}  // namespace detail

// The message of a failed check: its pieces (text, integers, floats, sizes,
// devices, dtypes) concatenated.
template <typename... Pieces>
std::string text(const Pieces&... pieces) {
  std::string out;
  (detail::append(out, pieces), ...);
  return out;
}

}  // namespace surgellm

// TORCH_CHECK (RuntimeError), _VALUE (ValueError), _TYPE (TypeError),
// _NOT_IMPLEMENTED (NotImplementedError) with the message built by
// surgellm::text.
#define SURGELLM_CHECK(cond, ...) TORCH_CHECK(cond, ::surgellm::text(__VA_ARGS__))
#define SURGELLM_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, ::surgellm::text(__VA_ARGS__))
#define SURGELLM_CHECK_TYPE(cond, ...) TORCH_CHECK_TYPE(cond, ::surgellm::text(__VA_ARGS__))
#define SURGELLM_CHECK_NOT_IMPLEMENTED(cond, ...) \
  TORCH_CHECK_NOT_IMPLEMENTED(cond, ::surgellm::text(__VA_ARGS__))

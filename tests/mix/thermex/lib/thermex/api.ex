defmodule Thermex.Api do
  @moduledoc false
  # Routes and JSON bodies of the HTTP endpoint; the same as thermo's.
  @vsn "@VSN@"

  # Callers must see a broken node as unhealthy, not hang on it: a suspended
  # or dead state process makes /health answer 503 quickly.
  @state_timeout 2000

  @paths ["/health", "/state", "/incr"]

  def handle(:GET, "/health"), do: health()
  def handle(:GET, "/state"), do: {200, Thermex.State.get()}
  def handle(:POST, "/incr"), do: {200, Thermex.State.incr()}
  def handle(_method, path) when path in @paths, do: {405, %{error: "method not allowed"}}
  def handle(_method, _path), do: {404, %{error: "not found"}}

  defp health do
    # From the loaded application spec, so it changes with a hot upgrade.
    vsn = Application.spec(:thermex, :vsn)

    base = %{
      version: List.to_string(vsn),
      node: Atom.to_string(node()),
      os_pid: System.pid()
    }

    state =
      try do
        {:ok, GenServer.call(Thermex.State, :get, @state_timeout)}
      catch
        :exit, reason -> {:error, reason}
      end

    case {state, Thermex.Health.check()} do
      {{:ok, %{counter: counter}}, :ok} ->
        {200, Map.merge(base, %{status: "ok", counter: counter})}

      {{:ok, %{counter: counter}}, {:failing, why}} ->
        {503, Map.merge(base, %{status: "failing", counter: counter, reason: why})}

      {{:error, why}, _} ->
        {503, Map.merge(base, %{status: "failing", reason: inspect(why)})}
    end
  end

  # --- JSON encoding (no dependencies) ---

  def encode_json(map) when is_map(map) do
    pairs =
      map
      |> Enum.map(fn {k, v} -> {key(k), v} end)
      |> Enum.sort()
      |> Enum.map(fn {k, v} -> [encode_string(k), ?:, encode_json(v)] end)

    [?{, Enum.intersperse(pairs, ?,), ?}]
  end

  def encode_json(list) when is_list(list),
    do: [?[, Enum.intersperse(Enum.map(list, &encode_json/1), ?,), ?]]

  def encode_json(true), do: "true"
  def encode_json(false), do: "false"
  def encode_json(nil), do: "null"
  def encode_json(atom) when is_atom(atom), do: encode_string(Atom.to_string(atom))
  def encode_json(int) when is_integer(int), do: Integer.to_string(int)
  def encode_json(float) when is_float(float), do: Float.to_string(float)
  def encode_json(bin) when is_binary(bin), do: encode_string(bin)

  defp key(k) when is_atom(k), do: Atom.to_string(k)
  defp key(k) when is_binary(k), do: k

  defp encode_string(bin), do: [?", for(<<c::utf8 <- bin>>, do: escape(c)), ?"]

  defp escape(?"), do: "\\\""
  defp escape(?\\), do: "\\\\"
  defp escape(?\n), do: "\\n"
  defp escape(?\r), do: "\\r"
  defp escape(?\t), do: "\\t"
  defp escape(c) when c < 0x20, do: :io_lib.format("\\u~4.16.0b", [c])
  defp escape(c), do: <<c::utf8>>
end

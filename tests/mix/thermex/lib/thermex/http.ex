defmodule Thermex.Http do
  @moduledoc false
  # A minimal HTTP/1.1 server on :gen_tcp, bound to 127.0.0.1.
  #
  # This GenServer owns the listen socket and keeps exactly one acceptor
  # process alive. An acceptor that gets a connection tells the server, which
  # starts the next acceptor, and then serves that one connection itself.
  #
  # Hot upgrades: an acceptor blocked in :gen_tcp.accept/1 runs the code of
  # the release it was started in, so the relup's purge of that code kills
  # it. The server traps exits and replaces a dead acceptor at once, with one
  # running the current code; the listen socket belongs to the server and
  # survives. The server sits in GenServer's loop between messages, so it
  # never runs purged code.
  use GenServer
  require Logger
  @vsn "@VSN@"

  @recv_timeout 5000
  @max_body 65536

  def start_link, do: GenServer.start_link(__MODULE__, [], name: __MODULE__)
  def port, do: GenServer.call(__MODULE__, :port)

  @impl true
  def init([]) do
    Process.flag(:trap_exit, true)
    # From the OS environment at start, not config/runtime.exs: a hot
    # upgrade resets the app env to the .app and sys.config.
    port = configured_port()
    opts = [:binary, ip: {127, 0, 0, 1}, active: false, reuseaddr: true, backlog: 128]

    case :gen_tcp.listen(port, opts) do
      {:ok, lsock} ->
        Logger.notice("Thermex.Http listening on 127.0.0.1:#{port}")
        {:ok, start_acceptor(%{lsock: lsock, port: port, acceptor: nil})}

      {:error, reason} ->
        {:stop, {:listen_failed, port, reason}}
    end
  end

  @impl true
  def handle_call(:port, _from, st), do: {:reply, st.port, st}
  def handle_call(_other, _from, st), do: {:reply, {:error, :unknown_call}, st}

  @impl true
  def handle_info({:accepted, pid}, %{acceptor: pid} = st) do
    # The connection's fate is no longer ours to care about.
    Process.unlink(pid)
    {:noreply, start_acceptor(st)}
  end

  def handle_info({:EXIT, pid, reason}, %{acceptor: pid} = st) do
    # Killed by a code purge, or accept failed: replace it.
    Logger.notice("Thermex.Http acceptor #{inspect(pid)} exited (#{inspect(reason)}), starting a new one")
    {:noreply, start_acceptor(st)}
  end

  def handle_info(_msg, st), do: {:noreply, st}

  @impl true
  def terminate(_reason, st), do: :gen_tcp.close(st.lsock)

  @impl true
  def code_change(_old_vsn, st, _extra), do: {:ok, st}

  defp start_acceptor(st) do
    pid = :proc_lib.spawn_link(Thermex.Http, :accept, [st.lsock, self()])
    %{st | acceptor: pid}
  end

  defp configured_port do
    case System.get_env("THERMEX_HTTP_PORT") do
      nil -> 8082
      value -> value |> String.trim() |> String.to_integer()
    end
  end

  # --- acceptor / connection process (called fully qualified, so that they
  # run the newest loaded code) ---

  @doc false
  def accept(lsock, server) do
    case :gen_tcp.accept(lsock) do
      {:ok, sock} ->
        send(server, {:accepted, self()})
        # A tail call: nothing of this module's current version stays on the
        # stack while the connection is served.
        Thermex.Http.serve(sock)

      {:error, :closed} ->
        exit(:normal)

      {:error, reason} ->
        exit({:accept_failed, reason})
    end
  end

  @doc false
  def serve(sock) do
    {status, body} =
      case read_request(sock) do
        {:ok, method, path} ->
          try do
            Thermex.Api.handle(method, path)
          catch
            class, reason ->
              Logger.error("Thermex.Http handler crashed: #{inspect({class, reason, __STACKTRACE__})}")
              {500, %{error: "internal error"}}
          end

        {:error, reason} ->
          {400, %{error: "bad request: #{inspect(reason)}"}}
      end

    json = Thermex.Api.encode_json(body)

    response = [
      "HTTP/1.1 #{status} #{reason_phrase(status)}\r\n",
      "Content-Type: application/json\r\n",
      "Content-Length: #{IO.iodata_length(json)}\r\n",
      "Connection: close\r\n\r\n",
      json
    ]

    _ = :gen_tcp.send(sock, response)
    :gen_tcp.close(sock)
  end

  # Request line and headers through the VM's HTTP packet parser, then the
  # body (if any) is read and dropped: closing a socket with unread input
  # sends a RST, which can destroy the response before the client reads it.
  defp read_request(sock) do
    :ok = :inet.setopts(sock, packet: :http_bin)

    case :gen_tcp.recv(sock, 0, @recv_timeout) do
      {:ok, {:http_request, method, {:abs_path, path}, _version}} ->
        case read_headers(sock, 0) do
          {:ok, length} when length <= @max_body ->
            case drain_body(sock, length) do
              :ok -> {:ok, method, path |> :binary.split("?") |> hd()}
              error -> error
            end

          {:ok, _too_long} ->
            {:error, :body_too_large}

          error ->
            error
        end

      {:ok, other} ->
        {:error, {:unexpected, other}}

      {:error, _} = error ->
        error
    end
  end

  defp read_headers(sock, length) do
    case :gen_tcp.recv(sock, 0, @recv_timeout) do
      {:ok, {:http_header, _, :"Content-Length", _, value}} ->
        case Integer.parse(String.trim(value)) do
          {n, ""} when n >= 0 -> read_headers(sock, n)
          _ -> {:error, :bad_content_length}
        end

      {:ok, {:http_header, _, _, _, _}} ->
        read_headers(sock, length)

      {:ok, :http_eoh} ->
        {:ok, length}

      {:ok, other} ->
        {:error, {:unexpected, other}}

      {:error, _} = error ->
        error
    end
  end

  defp drain_body(_sock, 0), do: :ok

  defp drain_body(sock, length) do
    :ok = :inet.setopts(sock, packet: :raw)

    case :gen_tcp.recv(sock, length, @recv_timeout) do
      {:ok, _} -> :ok
      {:error, _} = error -> error
    end
  end

  defp reason_phrase(200), do: "OK"
  defp reason_phrase(400), do: "Bad Request"
  defp reason_phrase(404), do: "Not Found"
  defp reason_phrase(405), do: "Method Not Allowed"
  defp reason_phrase(500), do: "Internal Server Error"
  defp reason_phrase(503), do: "Service Unavailable"
  defp reason_phrase(_), do: "Unknown"
end

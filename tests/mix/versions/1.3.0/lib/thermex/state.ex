defmodule Thermex.State do
  @moduledoc false
  # 1.3.0: the base state server, except that its state migration crashes,
  # which makes release_handler:install_release/1 fail after the point of no
  # return (the node then restarts itself on its permanent release).
  use GenServer
  require Record
  @vsn "@VSN@"

  Record.defrecordp(:state, counter: 0, started_at: nil)

  def start_link, do: GenServer.start_link(__MODULE__, [], name: __MODULE__)
  def get, do: GenServer.call(__MODULE__, :get)
  def incr, do: GenServer.call(__MODULE__, :incr)

  @impl true
  def init([]), do: {:ok, state(started_at: System.system_time(:second))}

  @impl true
  def handle_call(:get, _from, st), do: {:reply, to_map(st), st}

  def handle_call(:incr, _from, state(counter: c) = st) do
    new = state(st, counter: c + 1)
    {:reply, to_map(new), new}
  end

  def handle_call(_other, _from, st), do: {:reply, {:error, :unknown_call}, st}

  @impl true
  def code_change("1.0.0", _st, _extra), do: :erlang.error(:simulated_migration_bug)
  def code_change(_old_vsn, st, _extra), do: {:ok, st}

  defp to_map(state(counter: c, started_at: t)), do: %{counter: c, started_at: t}
end

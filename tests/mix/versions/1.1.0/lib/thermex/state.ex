defmodule Thermex.State do
  @moduledoc false
  # 1.1.0: the state gains `migrated_from`, set by code_change/3 when a
  # running 1.0.0 node is upgraded in place (nil, JSON null, on a fresh start).
  use GenServer
  require Record
  @vsn "@VSN@"

  Record.defrecordp(:state, counter: 0, started_at: nil, migrated_from: nil)

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

  # old_vsn is the @vsn of the module being replaced, a binary: "1.0.0"
  # going up; going down {:down, "1.0.0"}, and this (1.1.0) code converts
  # before 1.0.0 loads.
  @impl true
  def code_change("1.0.0", {:state, counter, started_at}, _extra),
    do: {:ok, state(counter: counter, started_at: started_at, migrated_from: "1.0.0")}

  def code_change({:down, "1.0.0"}, state(counter: counter, started_at: started_at), _extra),
    do: {:ok, {:state, counter, started_at}}

  def code_change(_old_vsn, state() = st, _extra), do: {:ok, st}

  defp to_map(state(counter: c, started_at: t, migrated_from: from)),
    do: %{counter: c, started_at: t, migrated_from: from}
end
